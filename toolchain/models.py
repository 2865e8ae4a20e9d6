"""CIFAR ResNets of He et al. 2016 (depth 6n+2, basic blocks, option-A shortcuts).

Parameter names follow the widely used public implementation (`conv1`, `bn1`,
`layer1.0.conv1`, ..., `linear`), so public checkpoints load without renaming.
A block's inner width (conv1's outputs = conv2's inputs) may differ from its
outer width: that is how method second's smaller models are described.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    if depth not in DEPTHS:
        raise ConfigError(f"unsupported depth {depth}; choose one of {', '.join(map(str, DEPTHS))}")
    return (depth - 2) // 6


def parse_arch(arch: str) -> int:
    """'resnet20' -> 20, with a clear error for anything else."""
    name = arch.lower().strip()
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in DEPTHS:
        return int(name[6:])
    raise ConfigError(f"unknown architecture {arch!r}; choose one of "
                     + ", ".join(f"resnet{d}" for d in DEPTHS))


def _subsample_and_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


class _ShortcutAsConv(torch.autograd.Function):
    """Option A written for ONNX as a 1x1 stride-2 Conv whose 0/1 weight is built in the graph.

    ONNX Runtime's CPU layout (NCHWc) has no Slice/Pad kernels, so the usual export forces
    layout reorders around every shortcut; a Conv stays in the blocked layout. The weight is
    EyeLike(k=-pad) of a [planes, in_planes] zero tensor, folded at load: no bytes in the file.
    """

    @staticmethod
    def forward(ctx, x, in_planes, pad):
        return _subsample_and_pad(x, pad)

    @staticmethod
    def symbolic(g, x, in_planes, pad):
        shape = g.op("Constant", value_t=torch.tensor([in_planes + 2 * pad, in_planes], dtype=torch.int64))
        zeros = g.op("ConstantOfShape", shape, value_t=torch.tensor([0.0]))
        eye = g.op("EyeLike", zeros, k_i=-pad)
        weight = g.op("Unsqueeze", eye, g.op("Constant", value_t=torch.tensor([2, 3], dtype=torch.int64)))
        return g.op("Conv", x, weight, kernel_shape_i=[1, 1], strides_i=[2, 2])


class ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling plus zero channel padding."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        self.in_planes, self.pad = in_planes, (planes - in_planes) // 2

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return _ShortcutAsConv.apply(x, self.in_planes, self.pad)
        return _subsample_and_pad(x, self.pad)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, inner: int | None = None):
        super().__init__()
        inner = planes if inner is None else inner
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()

    def hidden(self, x):
        """The block's inner activation: conv2's input."""
        return F.relu(self.bn1(self.conv1(x)))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(self.hidden(x))) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, inner_widths: list[int] | None = None):
        super().__init__()
        n = blocks_per_stage(depth)
        self.depth, self.num_classes = depth, num_classes
        if inner_widths is None:
            inner_widths = [w for w in STAGE_WIDTHS for _ in range(n)]
        if len(inner_widths) != 3 * n:
            raise ConfigError(f"resnet{depth} has {3 * n} blocks, got {len(inner_widths)} inner widths")
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths = iter(inner_widths)
        in_planes = 16
        for stage, planes in enumerate(STAGE_WIDTHS, start=1):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, next(widths)))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def blocks(self) -> list[BasicBlock]:
        return [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]

    def inner_widths(self) -> list[int]:
        return [b.conv1.out_channels for b in self.blocks()]

    def stem(self, x):
        """The first conv's activation: the first block's input."""
        return F.relu(self.bn1(self.conv1(x)))

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """gamma / sqrt(running_var + eps): how an eval-mode BN scales each channel."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift): an eval-mode BN computes scale * x + shift per channel."""
    scale = bn_scale(bn)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def set_bn_affine(bn: nn.BatchNorm2d, scale: torch.Tensor, shift: torch.Tensor,
                  mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> None:
    """Make an eval-mode `bn` compute scale * x + shift while holding the given running statistics
    (by default mean 0, variance 1): statistics can move to new data without changing the function."""
    mean = torch.zeros_like(shift) if mean is None else mean
    var = torch.full_like(shift, 1 - bn.eps) if var is None else var
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_(scale * torch.sqrt(var + bn.eps))
    bn.bias.copy_(scale * mean + shift)


@torch.no_grad()
def rescale_bn_input(bn: nn.BatchNorm2d, factor: torch.Tensor) -> None:
    """The conv before `bn` now outputs `factor` times what it did (per channel): move the running
    statistics with it and keep the function, in eval mode and in train mode alike."""
    scale, shift = bn_affine(bn)
    set_bn_affine(bn, scale / factor, shift, bn.running_mean * factor, bn.running_var * factor ** 2)


def build_model(arch: str = "resnet20", num_classes: int = 10,
                inner_widths: list[int] | None = None) -> CifarResNet:
    return CifarResNet(parse_arch(arch), num_classes, inner_widths)


def count_params(model: nn.Module) -> int:
    """Stored parameters: a shared (clustered) weight counts once, as its centroids."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size=(1, 3, 32, 32)) -> int:
    """Multiply-adds of convolutions and linear layers for one image, from a real forward pass."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output[0].numel() * k

    def linear_hook(module, inputs, output):
        nonlocal total
        total += module.in_features * module.out_features

    hooks = []
    for m in model.modules():
        if hasattr(m, "kernel_size") and hasattr(m, "in_channels"):  # nn.Conv2d and shared-weight convs
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(input_size, device=device)[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total
