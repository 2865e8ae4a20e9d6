import pytest
import torch

from toolchain.models import build_model, count_macs, count_params, parse_arch


@pytest.mark.parametrize("arch, params, macs", [
    ("resnet20", 269_722, 40_551_040),
    ("resnet32", 464_154, 68_862_592),
    ("resnet56", 853_018, 125_485_696),
])
def test_parameter_and_multiply_add_counts(arch, params, macs):
    model = build_model(arch)
    assert count_params(model) == params
    assert count_macs(model) == macs


def test_forward_shape_and_block_structure():
    model = build_model("resnet20")
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert model.inner_widths() == [16] * 3 + [32] * 3 + [64] * 3


def test_narrow_blocks_count_fewer_macs():
    narrow = build_model("resnet20", inner_widths=[8] * 3 + [16] * 3 + [32] * 3)
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_macs(narrow) < 0.6 * count_macs(build_model("resnet20"))


@pytest.mark.parametrize("bad", ["resnet21", "vgg16", "", "resnet"])
def test_unknown_architecture_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown architecture"):
        parse_arch(bad)
