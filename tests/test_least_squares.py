import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_resnet20
from toolchain.least_squares import _patches, capture, refit_classifier, relative_error, solve_conv_weight


@pytest.mark.parametrize("kernel, stride, padding", [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)),
                                                     ((1, 1), (2, 2), (0, 0)), ((3, 1), (1, 2), (0, 1))])
def test_patches_are_unfolds(kernel, stride, padding):
    x = torch.randn(2, 3, 9, 8)
    expected = F.unfold(x, kernel, padding=padding, stride=stride).transpose(0, 1).reshape(3 * kernel[0] * kernel[1], -1)
    assert torch.equal(_patches(x, kernel, stride, padding), expected)


@torch.no_grad()
def test_solve_recovers_a_known_strided_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(64, 6, 12, 12)
    y = conv(x)
    assert torch.allclose(solve_conv_weight(conv, x, y, ridge=1e-9, batch_size=16), conv.weight, atol=1e-4)
    assert relative_error(conv, x, y) == 0
    assert relative_error(conv, x, -y) == 4  # ||2y||^2 / ||y||^2


@torch.no_grad()
def test_capture_gives_layer_inputs_and_outputs_and_stops_early():
    model = random_resnet20()
    x = torch.randn(8, 3, 32, 32)
    reached_classifier = []
    model.linear.register_forward_hook(lambda *_: reached_classifier.append(True))
    stem = F.relu(model.bn1(model.conv1(x)))
    inputs, outputs = capture(model, [model.layer2[0].conv1], x, "input", batch_size=3)[0], \
        capture(model, [model.conv1, model.layer1[0].conv1], x, "output", batch_size=3)
    assert torch.allclose(inputs, model.layer1(stem), atol=1e-5)
    assert torch.allclose(outputs[0], model.conv1(x), atol=1e-5)
    assert torch.allclose(outputs[1], model.layer1[0].conv1(stem), atol=1e-5)
    assert not reached_classifier


@torch.no_grad()
def test_classifier_refit_recovers_the_original_classifier_from_the_same_features():
    original = random_resnet20().eval()
    model = random_resnet20().eval()
    model.load_state_dict(original.state_dict())
    model.linear.weight.normal_()
    model.linear.bias.normal_()
    x = torch.randn(96, 3, 32, 32)
    errors = refit_classifier(model, original, x, ridge=1e-9, batch_size=32)
    assert errors["relative_error_before"] > 0.5
    assert errors["relative_error_after"] < 1e-6
    torch.testing.assert_close(model(x), original(x), atol=1e-3, rtol=1e-3)
