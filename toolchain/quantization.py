"""Int8 simulated in PyTorch, as ONNX Runtime's static QDQ quantization will run it.

`simulate_int8(model)` makes the forward pass round what the int8 file rounds: every conv and
linear weight to int8 with a symmetric scale per output channel, and every activation tensor
between two quantized operators to uint8 with one scale and zero point per tensor (the image,
each conv's output after its BatchNorm and ReLU, each block's residual before the add and its
output after it, the pooled features, the logits). Rounding uses straight-through gradients, so
a fine-tune through it (quantization-aware training) learns weights that survive the rounding.
While training, activation ranges follow the batches (a moving average of their min and max);
`calibrate` then sets them as ONNX Runtime's calibration will: min and max over the calibration
images. Weight scales need no calibration: they are the weights' own largest magnitudes, and a
per-channel BatchNorm scale folded into a conv later scales them alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from .models import CifarResNet

QMIN, QMAX = -127, 127  # int8 weights: ONNX Runtime's symmetric range, the largest magnitude at 127


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 rounding of a weight (dimension 0 is the output channel)."""

    def __init__(self):
        super().__init__()
        self.rounding = True

    def forward(self, w):
        if not self.rounding:
            return w
        absmax = w.detach().flatten(1).abs().amax(1).clamp_min(1e-12)
        scale = (2 * absmax / (QMAX - QMIN)).float()
        zero = torch.zeros(len(w), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX)


class ActivationFakeQuant(nn.Module):
    """Per-tensor uint8 rounding of an activation, with the range containing 0 (as ONNX Runtime's)."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.calibrating = False
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    @torch.no_grad()
    def _observe(self, x):
        lo, hi = x.min().clamp_max(0), x.max().clamp_min(0)
        if not self.seen:
            self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
        elif self.calibrating:  # ONNX Runtime's min-max calibration: the extremes over all images
            self.lo.copy_(torch.minimum(self.lo, lo)), self.hi.copy_(torch.maximum(self.hi, hi))
        else:
            self.lo.lerp_(lo, self.momentum), self.hi.lerp_(hi, self.momentum)

    def forward(self, x, training: bool):
        """`training`: the hooked module's mode (the observers are not the model's submodules)."""
        if training or self.calibrating or not self.seen:
            self._observe(x)
        if self.calibrating:
            return x  # ONNX Runtime calibrates the float model: ranges of float activations
        scale = float((self.hi - self.lo).clamp_min(1e-8) / 255)
        zero = int(torch.round(-self.lo / scale).clamp(0, 255))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


class Int8Simulation:
    """The hooks and parametrizations `simulate_int8` added, and the observers; `remove` undoes them."""

    def __init__(self, model: CifarResNet):
        self.model, self.observers, self._handles, self._weights = model, nn.ModuleDict(), [], []
        self._roundings: list[WeightFakeQuant] = []

    def observer(self, name: str) -> ActivationFakeQuant:
        self.observers[name] = ActivationFakeQuant()
        return self.observers[name]

    def quantize_weight(self, module: nn.Module, name: str) -> None:
        rounding = WeightFakeQuant()
        parametrize.register_parametrization(module, name, rounding)
        self._weights.append((module, name))
        self._roundings.append(rounding)

    def on_output(self, module: nn.Module, name: str) -> None:
        q = self.observer(name)
        self._handles.append(module.register_forward_hook(lambda m, _args, out: q(out, m.training)))

    def on_input(self, module: nn.Module, name: str) -> None:
        q = self.observer(name)
        self._handles.append(module.register_forward_pre_hook(lambda m, args: (q(args[0], m.training), *args[1:])))

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 64) -> None:
        """Activation ranges as ONNX Runtime's min-max calibration sets them: the extremes of the float
        model's activations (no rounding anywhere) over these (normalised) images."""
        was_training = self.model.training
        self.model.eval()
        self._set(calibrating=True)
        for q in self.observers.values():
            q.seen.fill_(False)
        try:
            for i in range(0, len(images), batch_size):
                self.model(images[i:i + batch_size])
        finally:
            self._set(calibrating=False)
            self.model.train(was_training)

    def _set(self, calibrating: bool) -> None:
        for q in self.observers.values():
            q.calibrating = calibrating
        for r in self._roundings:
            r.rounding = not calibrating

    def remove(self) -> None:
        """The model back to float: hooks gone, weights as trained (unrounded; the quantizer rounds them)."""
        for h in self._handles:
            h.remove()
        for module, name in self._weights:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self._handles, self._weights = [], []


def simulate_int8(model: CifarResNet) -> Int8Simulation:
    """Make `model`'s forward pass (and its gradients) those of its static int8 version; in place."""
    from .methods.first import SharedConv2d

    sim = Int8Simulation(model)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            sim.quantize_weight(m, "weight")
        elif isinstance(m, SharedConv2d) and m.scale is None:
            sim.quantize_weight(m, "centroids")  # a centroid is an output channel's filter
    sim.on_input(model.conv1, "input")
    sim.on_input(model.layer1, "stem")
    for i, block in enumerate(model.blocks()):
        sim.on_input(block.conv2, f"block{i}_hidden")
        sim.on_output(block.bn2, f"block{i}_residual")
        sim.on_output(block, f"block{i}_output")
    sim.on_input(model.linear, "pooled")
    sim.on_output(model.linear, "logits")
    return sim


@contextmanager
def simulated(model: CifarResNet, images: torch.Tensor | None = None):
    """`model` as its int8 version inside the block (calibrated on `images` if given)."""
    sim = simulate_int8(model)
    try:
        if images is not None:
            sim.calibrate(images)
        yield sim
    finally:
        sim.remove()
