"""The structural peer of method second: L1-norm channel pruning done with Torch-Pruning.

What a user would run instead of method second (Li et al. 2017, "Pruning filters for
efficient ConvNets"): in every residual block keep the conv1 filters with the largest L1
norms, at exactly the widths method second keeps, and let Torch-Pruning's dependency graph
remove the matching BN1 channels and conv2 input channels. There is no data-aware step: the
pipeline recalibrates its BN statistics and fine-tunes it with the very loop, epochs,
learning rate and distillation that method second gets, so the two differ only in how the
kept channels are chosen and merged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import settings
from ..errors import ConfigError, ToolchainError
from ..models import CifarResNet
from . import Implementation
from .second import SecondConfig, kept_width


@dataclass
class L1Config:
    ratio: float = settings.RATIO
    round_to: int = 1  # as method second: the kept widths are the same
    allocation: str = settings.UNIFORM  # the only one: the peer is compared with method second's uniform widths

    def __post_init__(self):
        SecondConfig(ratio=self.ratio, round_to=self.round_to)  # the same checks as method second
        if self.allocation != settings.UNIFORM:
            raise ConfigError("the L1 peer prunes to uniform widths: --allocation is for methods first and second")


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise ToolchainError("the L1 peer needs Torch-Pruning: pip install -e '.[peers]'") from None
    return torch_pruning


def apply_l1(model: CifarResNet, cfg: L1Config) -> tuple[CifarResNet, dict]:
    """Prune every block's conv1 of a copy of `model` to method second's widths by filter L1 norm."""
    tp = _torch_pruning()
    model = copy.deepcopy(model).eval()
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    blocks = []
    for block in model.blocks():
        filters = block.conv1.out_channels
        kept = kept_width(filters, cfg.ratio, cfg.round_to)
        norms = block.conv1.weight.detach().abs().sum((1, 2, 3))
        dropped = norms.argsort()[: filters - kept].tolist()  # the smallest norms go
        if dropped:
            graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=dropped).prune()
        blocks.append({"filters": filters, "kept": kept})
    return model, {"blocks": blocks, "inner_widths": model.inner_widths()}


IMPLEMENTATION = Implementation(config=L1Config, apply=apply_l1)
