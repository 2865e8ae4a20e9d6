"""Method first at kernel granularity: every kh x kw kernel of a conv is an entry of a codebook.

A codebook of K kernels (or of a fraction of its kernels) is shared by the convs of its scope: each
conv alone (`layer`), the convs of a stage (`stage`; the stem counts with stage 1) or every conv
(`network`). A conv keeps an
index per (output, input) channel pair, uint8 for K <= 256, and rebuilds its weight as
`codebook[index]` reshaped to (out, in, kh, kw); fine-tuning trains the codebook, so kernels of
one entry stay identical, and with `reassign` moves each kernel to the entry nearest its shadow
weights. In ONNX that is Cast + Gather + Reshape over two initializers, which ONNX Runtime folds
when it loads the file.
"""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..clustering import kmeans
from ..errors import ConfigError
from ..least_squares import batched, conjugate_gradient, normal_equations, ridge_solve
from ..models import CifarResNet, bn_affine, set_bn_affine
from .convs import bn_after, clusterable_convs, clustering_inputs, conv_targets, fold_filter_scales, set_module
from .shared_tables import SharedTable, nearest_rows, through_shadow


class Codebook(SharedTable):
    """K kernels, each flattened: centroids (K, kh * kw). Stored as codes with one scale for the
    codebook: a scale per 9-number entry would cost almost as much as the entry's int8 codes."""

    row_scales = False


def index_dtype(size: int) -> torch.dtype:
    return torch.uint8 if size <= 256 else torch.int16


def index_buffer(index: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    """A conv's index into a codebook, one per kernel, as narrow as the codebook allows."""
    return index.flatten().to(index_dtype(len(codebook.centroids)))


class Residual(nn.Module):
    """A residual codebook (shared as the first) and an index into it: each kernel is its entry of the
    first codebook plus its entry of each residual one, which K-Means fit to what those before left over."""

    def __init__(self, codebook: Codebook, index: torch.Tensor):
        super().__init__()
        self.codebook = codebook
        self.register_buffer("index", index_buffer(index, codebook))


class CodebookConv2d(nn.Module):
    """A bias-free Conv2d whose kernels are entries of a (possibly shared) codebook, plus, with
    `residuals`, an entry of each residual codebook."""

    def __init__(self, conv: nn.Conv2d, codebook: Codebook, index: torch.Tensor, reassign: bool = False,
                 residuals: list[Residual] = ()):
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, attr, getattr(conv, attr))
        self.codebook = codebook  # the same module in every conv of the scope
        self.register_buffer("index", index_buffer(index, codebook))
        self.residuals = nn.ModuleList(residuals)
        # With `reassign`, the kernels as trainable shadow weights: each training step gives every
        # kernel the entry nearest its shadow (start_shadow sets them to the kernels as they are).
        self.shadow = nn.Parameter(self._kernels(rounded=False).detach().clone()) if reassign else None

    def stages(self) -> list[tuple[Codebook, torch.Tensor]]:
        """(codebook, index) whose entries add up to the kernels: the codebook's, then the residuals'."""
        return [(self.codebook, self.index)] + [(r.codebook, r.index) for r in self.residuals]

    def _kernels(self, rounded: bool = True) -> torch.Tensor:
        # Gather wants int32/int64 indices
        return sum(book.table(rounded).index_select(0, index.int()) for book, index in self.stages())

    @torch.no_grad()
    def start_shadow(self) -> None:
        """The shadow kernels set to their entries as they are (before any rounding to codes, as the
        shadows train), so that training starts from them."""
        if self.shadow is not None:
            self.shadow.copy_(self._kernels(rounded=False))

    @property
    def weight(self) -> torch.Tensor:
        if self.training and self.shadow is not None:
            stages = self.stages()
            indices = self._nearest_entries(stages)
            for (_, index), nearest in zip(stages, indices):
                index.copy_(nearest)
            kernels = through_shadow([(book.table(), index) for (book, _), index in zip(stages, indices)], self.shadow)
        else:
            kernels = self._kernels()
        return kernels.view(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @torch.no_grad()
    def _nearest_entries(self, stages) -> list[torch.Tensor]:
        """Each kernel's entries for its shadow: each stage's entry nearest what the stages before left
        over. With residuals that greedy combination can be farther from the shadow than the one the
        kernel has (the refit's, which training starts from), so a kernel keeps its own unless the new
        one is nearer. The unrounded entries: codes can round several entries to one, and argmin would take the first."""
        tables = [book.table(rounded=False).detach().double() for book, _ in stages]
        target = self.shadow.detach().double()
        greedy, left = [], target
        for table in tables:
            greedy.append(nearest_rows(left, table))
            left = left - table[greedy[-1]]
        if len(stages) == 1:
            return greedy  # the nearest entry: a shadow on its entry finds it

        def distance(indices):
            return (target - sum(table[i] for table, i in zip(tables, indices))).pow(2).sum(1)

        current = [index.long() for _, index in stages]
        keep = distance(current) <= distance(greedy)
        return [torch.where(keep, c, g) for c, g in zip(current, greedy)]

    def forward(self, x):
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        sizes = "+".join(str(len(book.centroids)) for book, _ in self.stages())
        return f"{self.in_channels}, {self.out_channels}, codebook={sizes}"


def scope_key(name: str, scope: str) -> str:
    """The codebook a conv of this name draws from."""
    if scope == "layer":
        return name
    if scope == "network":
        return "network"
    stage = name.split(".")[0]
    return "layer1" if stage == "conv1" else stage  # the stem's 3 input channels join stage 1


def _kernel_inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, features: str):
    """(kernels, weights) K-Means runs on: the filters' features (clustering_inputs) cut into kernels,
    each weighted as its filter; scaled divides each filter by its norm (folded into the BN afterwards)."""
    filters = conv.weight.detach().flatten(1).numpy().astype(np.float64)
    vectors, weights = clustering_inputs(filters, bn, features)
    return vectors.reshape(-1, conv.kernel_size[0] * conv.kernel_size[1]), np.repeat(weights, conv.weight.shape[1])


def codebook_entries(size: int | float, kernels: int) -> int:
    """How many entries a codebook over `kernels` kernels gets: `size` (at most one per kernel) or, for a
    fraction, that share of its kernels rounded up."""
    # (rounded first: 0.07 x 100 is 7.000000000000001 in floating point)
    entries = min(size, kernels) if isinstance(size, int) else min(kernels, max(2, math.ceil(round(size * kernels, 9))))
    if entries > settings.MAX_CODEBOOK:
        raise ConfigError(f"a codebook of {entries} entries (a fraction {size:g} of {kernels} kernels) is beyond "
                          f"the int16 index's {settings.MAX_CODEBOOK}: give a smaller fraction or a number")
    return entries


@torch.no_grad()
def apply_kernels(model: nn.Module, cfg) -> tuple[nn.Module, dict]:
    """Cluster the kernels of every chosen conv of a copy of `model` into codebooks of cfg.codebook_size
    entries (codebook_entries) per cfg.codebook_scope; returns it and a record per codebook."""
    model = copy.deepcopy(model)
    scopes = defaultdict(list)
    for name, conv, bn in clusterable_convs(model, cfg.layers):
        scopes[scope_key(name, cfg.codebook_scope)].append((name, conv, bn))
    if not scopes:
        raise ValueError("no convolution layer to cluster")
    records = []
    for key, convs in scopes.items():
        inputs = [_kernel_inputs(conv, bn, cfg.features) for _, conv, bn in convs]
        vectors, weights = np.concatenate([v for v, _ in inputs]), np.concatenate([w for _, w in inputs])
        entries = codebook_entries(cfg.codebook_size, len(vectors))
        stages, left = [], vectors
        while len(stages) < cfg.codebooks_per_kernel:
            stages.append(kmeans(left, entries, cfg.seed, cfg.n_init, weights))
            left = left - stages[-1].centroids[stages[-1].assignment]
            if entries == len(vectors):
                break  # a codebook of every kernel leaves nothing over
        books = [Codebook(torch.from_numpy(stage.centroids).float()) for stage in stages]
        start = 0
        for name, conv, bn in convs:
            count = conv.out_channels * conv.in_channels
            indices = [stage.assignment[start:start + count] for stage in stages]
            start += count
            if cfg.features == "scaled" and bn is not None:
                rebuilt = sum(stage.centroids[index] for stage, index in zip(stages, indices))
                fold_filter_scales(conv, bn, rebuilt.reshape(conv.out_channels, -1), np.arange(conv.out_channels))
            residuals = [Residual(book, torch.from_numpy(index)) for book, index in zip(books[1:], indices[1:])]
            set_module(model, name, CodebookConv2d(conv, books[0], torch.from_numpy(indices[0]), cfg.reassign, residuals))
        records.append({"codebook": key, "layers": [name for name, _, _ in convs], "kernels": len(vectors),
                        "k": len(stages[0].centroids), "residual_k": len(stages[1].centroids) if len(stages) > 1 else 0,
                        "residual_codebooks": len(stages) - 1, "inertia": stages[-1].inertia})
    return model, {"codebooks": records, "first": {"granularity": "kernel", "codebook_size": cfg.codebook_size,
                                                   "codebook_scope": cfg.codebook_scope, "features": cfg.features, "reassign": cfg.reassign,
                                                   "residual": cfg.residual, "residual_codebooks": cfg.residual_codebooks,
                                                   "n_init": cfg.n_init}}


def drop_shadows(model: nn.Module) -> None:
    """After fine-tuning: each conv keeps its last entries, without the shadow kernels."""
    for m in model.modules():
        if isinstance(m, CodebookConv2d):
            m.shadow = None


@dataclass
class _Layer:
    """One conv's least squares in its weight W: sum_o a_o^2 ||conv_W(x)_o - t_o||^2, as normal equations."""
    name: str
    conv: CodebookConv2d
    gram: torch.Tensor  # (in * taps)^2, shared by every output channel
    cross: torch.Tensor  # (in * taps, out)
    target_norms: torch.Tensor  # (out,) ||t_o||^2
    weight: torch.Tensor  # (out,) a_o^2: how an output's error reaches the BN output

    def error(self, w: torch.Tensor) -> float:
        """The weighted squared error of weight w (out, in * taps)."""
        per_output = ((w @ self.gram) * w).sum(1) - 2 * (w * self.cross.T).sum(1) + self.target_norms
        return float((self.weight * per_output).sum())

    def best_weight(self, ridge: float) -> torch.Tensor:
        """The unconstrained least-squares weight (out, in * taps): what the codebook should approximate."""
        return ridge_solve(self.gram, self.cross, ridge).T

    def channel_grams(self, taps: int) -> torch.Tensor:
        """(in, taps, taps): the second moments of each input channel's patches."""
        cin = len(self.gram) // taps
        g = self.gram.view(cin, taps, cin, taps)
        return g[torch.arange(cin), :, torch.arange(cin), :]


# In the refit, the entries of a conv's codebooks (the codebook, and the residuals' after it) are one
# table, and its index is (out, in, stages) into that table: a kernel is the sum of its stages' entries.

def _rebuilt(entries: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return entries[index].sum(2).flatten(1)  # (out, in, stages, taps) -> (out, in * taps)


def _assign(layer: _Layer, entries: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Each kernel's entry by the error it adds at the conv's output, not in the weight (And the Bit Goes
    Down, Stock et al. 2020): (w - e)^T S_c (w - e) with S_c its input channel's patch moments."""
    taps = entries.shape[1]
    s = layer.channel_grams(taps)  # (in, taps, taps)
    w = best.view(len(best), -1, taps)  # (out, in, taps)
    se = torch.einsum("cab,kb->cka", s, entries)  # (in, K, taps)
    quadratic = (se * entries[None]).sum(2)  # (in, K)
    cost = quadratic[None] - 2 * torch.einsum("oca,cka->ock", w, se)
    return cost.argmin(2)


def _assign_stages(layer: _Layer, entries: torch.Tensor, bounds: list[tuple[int, int]], best: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """`_assign` for each stage in turn, within its own entries (bounds), its target what the other
    stages' entries leave of the best weight."""
    index = index.clone()
    w = best.view(*index.shape[:2], -1)  # (out, in, taps)
    for stage, (start, end) in enumerate(bounds):
        others = entries[index].sum(2) - entries[index[..., stage]]
        index[..., stage] = _assign(layer, entries[start:end], (w - others).flatten(1)) + start
    return index


def _onto_entries(per_kernel: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """(size, taps): per-kernel terms (out, in, taps) summed onto the entries each kernel draws from
    (every stage's: the kernel is their sum, so each gets the kernel's whole term)."""
    stages, taps = index.shape[2], per_kernel.shape[2]
    terms = per_kernel[:, :, None].expand(-1, -1, stages, -1).reshape(-1, taps)
    return torch.zeros(size, taps, dtype=torch.float64).index_add_(0, index.flatten(), terms)


def _entry_rhs(layer: _Layer, index: torch.Tensor, size: int, taps: int) -> torch.Tensor:
    """(size, taps): the right-hand side of the layer's normal equations in its codebooks' entries:
    output o's weight is the sum of entries[index[o, c, :]] for every input c, so the terms of all
    (o, c) drawing from one entry add up, each output's counted a_o^2."""
    out, cin, _ = index.shape
    return _onto_entries(layer.cross.T.reshape(out, cin, taps) * layer.weight[:, None, None], index, size)


def _entry_product(layer: _Layer, index: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """The layer's normal-equation matrix times `entries` (size, taps), without forming the matrix:
    the weight the entries make, through the patches' second moments, summed back onto the entries."""
    out, cin, _ = index.shape
    product = (_rebuilt(entries, index) @ layer.gram) * layer.weight[:, None]  # (out, in * taps)
    return _onto_entries(product.view(out, cin, -1), index, len(entries))


def _entry_blocks(layer: _Layer, index: torch.Tensor, size: int, taps: int) -> torch.Tensor:
    """(size, taps, taps): each entry's own diagonal block of the layer's normal-equation matrix (an
    output drawing from one entry at several inputs adds their cross moments too). Each stage of an
    input counts as an input of its own, with that input's moments."""
    out, cin, stages = index.shape
    slots = index.reshape(out, cin * stages)
    same = (slots[:, :, None] == slots[:, None, :]).double() * layer.weight[:, None, None]  # (out, slots, slots)
    gram = layer.gram.view(cin, 1, taps, cin, 1, taps).expand(-1, stages, -1, -1, stages, -1)
    per_slot = torch.einsum("ocd,cadb->ocab", same, gram.reshape(cin * stages, taps, cin * stages, taps))
    return torch.zeros(size, taps, taps, dtype=torch.float64).index_add_(0, slots.flatten(),
                                                                         per_slot.reshape(-1, taps, taps))


def _solve_entries(layers: list[_Layer], indices: list[torch.Tensor], entries: torch.Tensor, ridge: float) -> torch.Tensor:
    """The entries' ridge least squares for the convs drawing from them, as ridge_solve would give it
    (the ridge pulls toward the entries as they are, so unused ones stay), by conjugate gradients
    preconditioned by each entry's own block: the matrix of a 4,096-entry codebook would take 10 GB,
    and even at 256 entries building it cost more than the iterations."""
    size, taps = entries.shape
    pairs = list(zip(layers, indices))
    rhs = sum(_entry_rhs(layer, index, size, taps) for layer, index in pairs)
    blocks = sum(_entry_blocks(layer, index, size, taps) for layer, index in pairs)
    strength = ridge * torch.diagonal(blocks, dim1=1, dim2=2).mean()  # ridge_solve's: the matrix's diagonal
    inverse = torch.linalg.inv(blocks + strength * torch.eye(taps, dtype=blocks.dtype))
    return conjugate_gradient(lambda v: sum(_entry_product(layer, index, v) for layer, index in pairs) + strength * v,
                              rhs + strength * entries, entries, lambda r: torch.einsum("kab,kb->ka", inverse, r))


class _Table:
    """The codebooks a scope's convs draw from (the codebook, and the residuals') as one table of
    entries, and each conv's index into it, (out, in, stages)."""

    def __init__(self, conv: CodebookConv2d):
        self.books = [book for book, _ in conv.stages()]
        sizes = [len(book.centroids) for book in self.books]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.bounds = [(start, start + size) for start, size in zip(starts, sizes)]

    def entries(self) -> torch.Tensor:
        return torch.cat([book.centroids.detach().double() for book in self.books])

    def index(self, conv: CodebookConv2d) -> torch.Tensor:
        return torch.stack([index.long().view(conv.out_channels, -1) + start
                            for (_, index), (start, _) in zip(conv.stages(), self.bounds)], 2)

    def set(self, entries: torch.Tensor, layers: list[_Layer] = (), indices: list[torch.Tensor] = ()) -> None:
        for book, (start, end) in zip(self.books, self.bounds):
            book.centroids.copy_(entries[start:end].float())
        for layer, index in zip(layers, indices):
            for stage, ((_, buffer), (start, _)) in enumerate(zip(layer.conv.stages(), self.bounds)):
                buffer.copy_((index[..., stage] - start).flatten().to(buffer.dtype))


@torch.no_grad()
def _solve_codebook(table: _Table, layers: list[_Layer], ridge: float) -> None:
    """The entries of one scope's codebooks solved for the convs so far, their indices kept."""
    table.set(_solve_entries(layers, [table.index(layer.conv) for layer in layers], table.entries(), ridge))


@torch.no_grad()
def _refit_codebook(table: _Table, layers: list[_Layer], rounds: int, ridge: float) -> dict:
    """Reassign (`rounds` times) and solve the entries of one scope's codebooks; sets them and the convs' indices."""
    entries = table.entries()
    indices = [table.index(layer.conv) for layer in layers]

    def error(e, idx):
        return sum(layer.error(_rebuilt(e, i)) for layer, i in zip(layers, idx))

    norm = sum(float((layer.weight * layer.target_norms).sum()) for layer in layers)
    before = error(entries, indices)
    best = [layer.best_weight(ridge) for layer in layers]
    for _ in range(rounds):  # each round ends on a solve: another with the same indices would barely move the entries
        indices = [_assign_stages(layer, entries, table.bounds, w, i) for layer, w, i in zip(layers, best, indices)]
        entries = _solve_entries(layers, indices, entries, ridge)
    table.set(entries, layers, indices)
    return {"layers": [layer.name for layer in layers], "relative_error_before": before / norm,
            "relative_error_after": error(entries, indices) / norm,
            "entries_used": int(torch.cat([i.flatten() for i in indices]).unique().numel())}


@torch.no_grad()
def refit_codebooks(model: CifarResNet, original: CifarResNet, images: torch.Tensor, rounds: int | None = None,
                    ridge: float = 1e-3, batch_size: int = 256) -> list[dict]:
    """Data-aware codebooks, fit to the original convs' outputs at the BN outputs on calibration images.

    A conv's output is linear in its codebook's entries, so given the indices the entries are one
    least-squares solve over every conv drawing from the codebook; given the entries, each kernel takes
    the entry that adds the least error at the conv's output (`_assign`). Walked in network order,
    each conv fed by the model so far, so later convs correct the errors of earlier ones. A codebook
    shared by several convs has its entries solved again at each of them (the next conv then sees
    the entries fit so far); at its last conv, `rounds` alternations of assignment and solve
    (by default three for a shared codebook, whose entries were fit one conv at a time; two for a
    conv's own, where a third changes little and costs a solve per conv). Where a codebook is
    shared, each output channel's gain and offset are fit after (`correct_channels`). Returns each
    codebook's relative squared error at the BN outputs before and after.
    """
    modules = dict(model.named_modules())
    names = [name for name, m in modules.items() if isinstance(m, CodebookConv2d) and m.codebook.scale is None]
    last = {id(modules[name].codebook): name for name in names}
    pending = defaultdict(list)
    records = []
    for name, conv, x, output, a, a_new in conv_targets(model, original, names, images, batch_size):
        target = output * (a / a_new).view(1, -1, 1, 1)  # the original's output, at this conv's
        gram, cross = normal_equations(conv, x, target)
        pending[id(conv.codebook)].append(_Layer(name, conv, gram, cross, target.double().pow(2).sum((0, 2, 3)),
                                                 a_new.double() ** 2))
        if last[id(conv.codebook)] == name:
            layers = pending.pop(id(conv.codebook))
            default_rounds = 3 if len(layers) > 1 else 2
            records.append(_refit_codebook(_Table(conv), layers, default_rounds if rounds is None else rounds, ridge))
        else:  # the convs after this one in the scope see its output with the entries fit so far
            _solve_codebook(_Table(conv), pending[id(conv.codebook)], ridge)
    convs_of = Counter(id(modules[name].codebook) for name in names)
    correct_channels(model, original, [n for n in names if convs_of[id(modules[n].codebook)] > 1], images, batch_size)
    for name in names:
        modules[name].start_shadow()
    return records


@torch.no_grad()
def correct_channels(model: CifarResNet, original: CifarResNet, names: list[str], images: torch.Tensor,
                     batch_size: int = 256) -> None:
    """Per output channel of each named conv, the gain and offset (g y + c) that best fit the original's
    output, folded into the BN after the conv; in network order, each conv fed by the model so far.

    A codebook shared by several convs was solved while the convs after its first still saw earlier
    entries, so their outputs drift from what was fit; and no entry can give each output channel its
    own scale. Both are per-channel affine errors, which the BN absorbs for free (bias correction,
    and a scale beside it). A codebook of one conv has no drift, and measured no better with the fit."""
    if not names:
        return  # (conv_targets would still run both models over the images)
    modules = dict(model.named_modules())
    for name, conv, x, output, a, a_new in conv_targets(model, original, names, images, batch_size):
        bn = bn_after(modules, name)
        if bn is None:
            continue
        y = batched(conv, x, batch_size).double()
        t = output.double() * (a / a_new).double().view(1, -1, 1, 1)  # the original's output at this conv's BN
        y_mean, t_mean = y.mean((0, 2, 3)), t.mean((0, 2, 3))
        y_dev, t_dev = y - y_mean.view(1, -1, 1, 1), t - t_mean.view(1, -1, 1, 1)
        variance = y_dev.pow(2).mean((0, 2, 3))
        fitted = (y_dev * t_dev).mean((0, 2, 3)) / variance.clamp_min(1e-30)
        ok = (variance > 1e-12 * variance.mean().clamp_min(1e-30)) & (fitted.abs() > 1e-6)  # else the BN stays
        gain = torch.where(ok, fitted, torch.ones_like(fitted))
        offset = torch.where(ok, t_mean - gain * y_mean, torch.zeros_like(fitted))
        gain, offset = gain.to(bn.weight.dtype), offset.to(bn.weight.dtype)
        scale, shift = bn_affine(bn)  # BN now gets g y + c: the statistics move with it
        set_bn_affine(bn, scale * gain, scale * offset + shift, (bn.running_mean - offset) / gain,
                      bn.running_var / gain ** 2)
