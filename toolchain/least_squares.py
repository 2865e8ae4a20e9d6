"""Ridge least squares for conv weights on calibration activations, shared by both methods.

Both methods refit a compressed conv so that, fed by the compressed network so far, it
reproduces the original conv's output: method second refits each block's conv2, method
first refits each layer's centroids (per-filter solutions averaged over the cluster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import BasicBlock


def batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _patches(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """The conv's input patches as a (in_channels * kh * kw, positions) matrix, rows ordered as the
    weight's (in_channels, kh, kw): F.unfold's columns, transposed. Built from strided slices in one
    copy (F.unfold and a transpose to this layout took most of a refit's time)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph)).transpose(0, 1)
    return torch.stack([padded[:, :, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw]
                        for dy in range(kh) for dx in range(kw)], 1).reshape(c * kh * kw, -1)


@torch.no_grad()
def normal_equations(conv: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                     batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^T A, A^T Y) in float64 of the least squares conv_W(inputs) ~ target, A the input patches
    (rows ordered as the weight's in_channels, kh, kw) and Y the target's channels.

    `conv` gives the geometry (kernel, stride, padding). Patches are built `batch_size` images at a
    time: 64 ran a method-first refit faster than 256, the patches staying in the caches."""
    kernel = tuple(conv.kernel_size)
    dim = conv.in_channels * kernel[0] * kernel[1]
    channels = target.shape[1]
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    cross = torch.zeros(dim, channels, dtype=torch.float64)
    for i in range(0, len(inputs), batch_size):
        patches = _patches(inputs[i:i + batch_size], kernel, conv.stride, conv.padding)
        y = target[i:i + batch_size].transpose(0, 1).reshape(channels, -1)
        # float32 products per batch (fast), summed over batches in float64
        gram += (patches @ patches.T).double()
        cross += (patches @ y.T).double()
    return gram, cross


@torch.no_grad()
def solve_conv_weight(conv: nn.Module, inputs: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3,
                      batch_size: int = 64) -> torch.Tensor:
    """argmin_W ||conv_W(inputs) - target||^2 + ridge * mean(diag) * ||W||^2, bias-free;
    W shaped (target channels, in_channels, kh, kw)."""
    gram, cross = normal_equations(conv, inputs, target, batch_size)
    return ridge_solve(gram, cross, ridge).T.reshape(target.shape[1], conv.in_channels,
                                                      *conv.kernel_size).float()


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_W ||A W - Y||^2 + ridge * mean(diag(A^T A)) * ||W - prior||^2 from gram = A^T A,
    cross = A^T Y (prior: zero by default)."""
    strength = ridge * gram.diagonal().mean()
    lhs = gram + strength * torch.eye(len(gram), dtype=gram.dtype)
    rhs = cross if prior is None else cross + strength * prior
    factor, info = torch.linalg.cholesky_ex(lhs)  # symmetric positive definite: Cholesky is cheaper than LU
    return torch.cholesky_solve(rhs, factor) if info == 0 else torch.linalg.solve(lhs, rhs)


def conjugate_gradient(apply, rhs: torch.Tensor, start: torch.Tensor, precondition, rtol: float = 1e-10,
                       max_steps: int = 2000) -> torch.Tensor:
    """x with apply(x) = rhs, `apply` a symmetric positive definite linear map given only as a function
    (preconditioned conjugate gradients, from `start`, until the residual is rtol of rhs): for systems
    too large to hold as a matrix. `precondition` applies an approximate inverse."""
    x = start.clone()
    residual = rhs - apply(x)
    z = precondition(residual)
    direction, rz = z.clone(), (residual * z).sum()
    tolerance = rtol * rhs.norm()
    for _ in range(max_steps):
        if residual.norm() <= tolerance:
            break
        step = apply(direction)
        alpha = rz / (direction * step).sum()
        x += alpha * direction
        residual -= alpha * step
        z = precondition(residual)
        rz, previous = (residual * z).sum(), rz
        direction = z + (rz / previous) * direction
    return x


@torch.no_grad()
def refit_classifier(model: nn.Module, original: nn.Module, images: torch.Tensor, ridge: float = 1e-3,
                     batch_size: int = 256) -> dict:
    """Refit `model.linear` (weight and bias) by ridge least squares so that the compressed features
    give the original model's logits: the last layer sees every earlier error, and a linear layer's
    exact fit is one small solve. Returns the logits' relative squared error before and after."""
    features = capture(model, [model.linear], images, "input", batch_size)[0].double()
    target = batched(original.eval(), images, batch_size).double()
    design = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
    solution = ridge_solve(design.T @ design, design.T @ target, ridge)

    def error() -> float:
        return float(((batched(model.linear, features.float(), batch_size) - target) ** 2).sum() / (target ** 2).sum())

    before = error()
    model.linear.weight.copy_(solution[:-1].T.float())
    model.linear.bias.copy_(solution[-1].float())
    return {"relative_error_before": before, "relative_error_after": error()}


@torch.no_grad()
def block_inputs(model: nn.Module, images: torch.Tensor, batch_size: int = 256):
    """(name, block, its input) for each residual block of a CIFAR ResNet in network order, in eval
    mode. Each input is computed when the caller asks for the next block, by the model as it is
    then: a layer refit in between feeds the blocks after it, in one forward pass in all."""
    model.eval()
    x = batched(model.stem, images, batch_size)
    for name, block in model.named_modules():
        if isinstance(block, BasicBlock):
            yield name, block, x
            x = batched(block, x, batch_size)


@torch.no_grad()
def relative_error(fn, inputs: torch.Tensor, target: torch.Tensor, batch_size: int = 256) -> float:
    """||fn(inputs) - target||^2 / ||target||^2 (fn: a module or any function of a batch)."""
    out = batched(fn, inputs, batch_size)
    return float(((out - target) ** 2).sum() / (target ** 2).sum())


class _Captured(Exception):
    """Raised once every hooked layer has fired, so the rest of the forward pass is skipped."""


@torch.no_grad()
def capture(model: nn.Module, layers: list[nn.Module], images: torch.Tensor, which: str = "input",
            batch_size: int = 256) -> list[torch.Tensor]:
    """The input (or output) of each of `layers` when `model` runs on `images` in eval mode;
    one pass, stopped early once the last of them has run."""
    captured = [[] for _ in layers]
    fired = []

    def hook_for(index):
        def hook(_module, args, output):
            captured[index].append(args[0] if which == "input" else output)
            fired.append(index)
            if len(fired) == len(layers):
                raise _Captured

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for i in range(0, len(images), batch_size):
            fired.clear()
            try:
                model(images[i:i + batch_size])
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(c) for c in captured]
