"""checkpoint -> compress -> (recalibrate, fine-tune) -> ONNX export with output check -> manifest.

One function per step; `run_export` chains them and is what `toolchain export` calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoints import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from .data import Split, load_split, to_tensor
from .errors import ToolchainError
from .models import count_macs, count_params
from .training import TrainConfig, evaluate, fit, recalibrate_bn

METHODS = ("first", "second", "l1", "none")  # l1: the structural peer (Torch-Pruning), for comparison
REFITS = ("first", "second")  # methods with a data-aware least-squares refit
# Default weight of the block-output distillation: at ratio 0.5 it gained method second 0.25 points
# over four seeds after 5 epochs (86.57% against 86.32%); level for method first and the L1 peer.
FEATURE_WEIGHT = 1.0


@dataclass
class ExportConfig:
    method: str = "first"
    ratio: float = 0.5
    checkpoint: str | None = None  # None: the shipped baseline
    arch: str | None = None
    data: str | None = None  # None: $CIFAR10_ROOT, if set
    finetune_epochs: int = 3
    finetune_lr: float = 0.01
    distill: bool = True
    # The teacher's settings. None: the default with a teacher, off without one, so that --no-distill
    # alone turns them off while a value given without a teacher is refused.
    distill_features: float | None = None  # weight of the residual blocks' outputs matched to the original's
    distill_temperature: float | None = None  # softmax temperature of the logit distillation
    centroid_bits: int | None = None  # method first: 8 for int8 centroids, 4 for packed 4-bit ones
    round_to: int | None = None  # method second: channel multiple of kept widths
    # Data-aware least-squares refit (first: centroids, second: each block's conv2) on calibration
    # images, then BN statistics moved to the data with the function kept (a plain recalibration
    # would blur the refit). False: no refit, BN statistics plainly recalibrated.
    reconstruct: bool = True
    calibration_images: int = 1024
    # Also measure the model right after compression, before any refit or recalibration: the
    # report's stage plot. One more pass over the test images (3-5 s; an export without
    # fine-tuning takes 17 s here without it).
    stage_accuracy: bool = False
    train_limit: int | None = None  # subsets, for quick runs and tests
    test_limit: int | None = None
    seed: int = 0
    out: str | None = None
    method_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ToolchainError(f"unknown method {self.method!r}; choose first, second, l1 or none")
        if self.method != "none" and not 0 < self.ratio < 1:
            raise ToolchainError(f"ratio {self.ratio} is not between 0 and 1 (exclusive)")
        if self.finetune_epochs < 0:
            raise ToolchainError("--finetune-epochs must be 0 or more")
        self._resolve_distillation()
        if self.method == "first" and self.centroid_bits is not None:
            from .methods.first import check_bits
            check_bits(self.centroid_bits)
        method_config(self)  # a bad method option fails here, before any work

    def _resolve_distillation(self) -> None:
        """Teacher settings: the defaults with a teacher; none without one, where a value is refused.

        Resolved in place, so `dataclasses.replace(cfg, distill=...)` keeps the settings and is
        refused (or keeps the feature weight off) rather than re-deciding them: set them anew too."""
        features_error = "--distill-features takes a weight of 0 or more, and the teacher (not with --no-distill)"
        temperature_error = "--distill-temperature takes a temperature above 0, and the teacher (not with --no-distill)"
        if not self.distill:
            if self.distill_features is not None:
                raise ToolchainError(features_error)
            if self.distill_temperature is not None:
                raise ToolchainError(temperature_error)
            return
        if self.distill_features is None:
            self.distill_features = FEATURE_WEIGHT
        if self.distill_temperature is None:
            self.distill_temperature = TrainConfig.distill_temperature
        if not self.distill_features >= 0:  # NaN too
            raise ToolchainError(features_error)
        if not self.distill_temperature > 0:
            raise ToolchainError(temperature_error)

    def tag(self) -> str:
        """Short name of what this config makes: none, first_r0.5, first_r0.6_int8, second_r0.5_latency, ..."""
        if self.method == "none":
            return "none"
        allocation = method_options(self.method, self.method_options).get("allocation", "uniform")
        return (f"{self.method}_r{self.ratio:g}" + ("" if allocation == "uniform" else f"_{allocation}")
                + (f"_int{self.centroid_bits}" if self.centroid_bits and self.method == "first" else ""))

    def default_out(self, arch: str) -> Path:
        return Path("artifacts") / f"{arch}_{self.tag()}.onnx"


@dataclass
class Data:
    train: Split
    test: Split


def load_data(data: str | None, train_limit: int | None = None, test_limit: int | None = None,
              seed: int = 0) -> Data | None:
    """Train and test splits when a dataset is given or $CIFAR10_ROOT is set; None otherwise."""
    if data is None and not os.environ.get("CIFAR10_ROOT"):
        return None
    return Data(load_split(data, "train").subset(train_limit, seed),
                load_split(data, "test").subset(test_limit, seed))


def check_inputs(ckpt: Checkpoint, data: Data | None, n: int = 64) -> torch.Tensor:
    """Real test images when there are some, else seeded noise of the same scale."""
    if data is not None:
        return to_tensor(data.test.images[:n], ckpt.mean, ckpt.std)
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def method_options(method: str, options: dict) -> dict:
    """The method options (CLI: --features, --allocation, --keep) that `method`'s config takes."""
    from dataclasses import fields

    from .methods.first import FirstConfig
    from .methods.l1_peer import L1Config
    from .methods.second import SecondConfig
    config_class = {"first": FirstConfig, "second": SecondConfig, "l1": L1Config}.get(method)
    names = {f.name for f in fields(config_class)} if config_class else set()
    return {k: v for k, v in options.items() if k in names}


def method_config(cfg: ExportConfig):
    """The method's own config (FirstConfig, SecondConfig, L1Config; None for none) from cfg."""
    if cfg.method == "none":
        return None  # before the imports: the sweep's shared settings and the baseline need none of them
    from .methods.first import FirstConfig
    from .methods.l1_peer import L1Config
    from .methods.second import SecondConfig, cpu_channel_block

    options = method_options(cfg.method, cfg.method_options)
    if cfg.method == "first":
        return FirstConfig(ratio=cfg.ratio, seed=cfg.seed, **options)
    round_to = cfg.round_to or cpu_channel_block()
    if cfg.method == "second":
        return SecondConfig(ratio=cfg.ratio, seed=cfg.seed, round_to=round_to, **options)
    if cfg.method_options.get("allocation", "uniform") != "uniform":
        raise ToolchainError("the L1 peer prunes to uniform widths: --allocation is for methods first and second")
    return L1Config(ratio=cfg.ratio, round_to=round_to)


def compress(cfg: ExportConfig, ckpt: Checkpoint) -> tuple[torch.nn.Module, dict]:
    """Apply the configured method to a copy of the model; returns it and what was done."""
    import copy

    from .methods.first import apply_first
    from .methods.l1_peer import apply_l1
    from .methods.second import apply_second

    if cfg.method == "none":
        return copy.deepcopy(ckpt.model).eval(), {}
    model = ckpt.model.eval()  # the methods work on a copy
    method = method_config(cfg)
    if cfg.method == "first":
        return apply_first(model, method)
    model, info = (apply_second if cfg.method == "second" else apply_l1)(model, method)
    info["round_to"] = method.round_to
    return model, info


def reconstruct(model, ckpt: Checkpoint, data: Data, cfg: ExportConfig) -> list[dict]:
    """The method's least-squares refit on seeded calibration images from the training split."""
    from .methods.first import refit_centroids
    from .methods.second import reconstruct as reconstruct_blocks
    def calibration(n: int, seed: int):
        return to_tensor(data.train.subset(n, seed).images, ckpt.mean, ckpt.std)

    images = calibration(cfg.calibration_images, cfg.seed)
    if cfg.method == "first":
        return refit_centroids(model, ckpt.model, images)
    # The classifier gets images of its own, and more of them: features of the blocks' calibration
    # images are fit to those images (ratio 0.5 before fine-tuning: 77.45% fit on the same 1,024,
    # 77.76 / 78.12 / 78.30% on 1,024 / 2,048 / 4,096 others).
    return reconstruct_blocks(model, ckpt.model, images, calibration(4 * cfg.calibration_images, cfg.seed + 1))


def finetune(model, teacher, ckpt: Checkpoint, data: Data, cfg: ExportConfig, log,
             rank: int = 0, world_size: int = 1) -> list[dict]:
    """A few epochs of the training loop at a low learning rate, distilling from the original."""
    teacher_settings = dict(feature_distill_weight=cfg.distill_features,
                            distill_temperature=cfg.distill_temperature) if cfg.distill else {}
    tcfg = TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, seed=cfg.seed, **teacher_settings)
    history = fit(model, data.train, data.test, tcfg, teacher=teacher if cfg.distill else None,
                  mean=ckpt.mean, std=ckpt.std, log=log, rank=rank, world_size=world_size)
    # Wall times stay in the log: the manifest must be the same for the same command.
    return [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in history]


def _quiet(_line) -> None:
    pass


def load_source(cfg: ExportConfig) -> tuple[Checkpoint, Path]:
    """The checkpoint to compress (the shipped baseline unless cfg names one) and its path."""
    source = Path(cfg.checkpoint) if cfg.checkpoint else DEFAULT_CHECKPOINT
    return load_checkpoint(source, cfg.arch), source


@dataclass
class Compressed:
    """A compressed (and, with data, refit and fine-tuned) model ready to export."""
    model: torch.nn.Module
    ckpt: Checkpoint
    source: Path
    data: Data | None
    info: dict
    accuracy: dict


def compress_and_tune(cfg: ExportConfig, ckpt: Checkpoint, source: Path, data: Data | None, log=print,
                      rank: int = 0, world_size: int = 1) -> Compressed:
    """Compress, then with data: refit (or recalibrate) and fine-tune, measuring each stage."""
    from .methods.first import TRAINED_BITS, train_quantized

    model, info = compress(cfg, ckpt)
    accuracy = {}
    rounded_from_refit = cfg.method == "first" and cfg.centroid_bits == TRAINED_BITS
    if data is not None and cfg.method != "none":
        def measure(stage):
            if rank != 0:
                return  # only rank 0 reports; the others would evaluate the same model again
            accuracy[stage] = evaluate(model, data.test, mean=ckpt.mean, std=ckpt.std)
            log(f"accuracy {stage}: {accuracy[stage]:.4f}")

        if cfg.stage_accuracy:
            measure("clustered" if cfg.method in REFITS else "pruned")
        refit = cfg.reconstruct and cfg.method in REFITS
        if refit:
            info["reconstruction"] = reconstruct(model, ckpt, data, cfg)
        if rounded_from_refit:
            # Rounded from here on: the statistics, the measurement and the fine-tune see the stored weights.
            train_quantized(model, cfg.centroid_bits)
        # After a refit the statistics move to the data while the function is kept (see recalibrate_bn).
        recalibrate_bn(model, data.train, seed=cfg.seed, mean=ckpt.mean, std=ckpt.std, keep_outputs=refit)
        measure("reconstructed" if refit else "recalibrated")
        if cfg.finetune_epochs:
            info["finetune_history"] = finetune(model, ckpt.model, ckpt, data, cfg, log, rank, world_size)
            accuracy["finetuned"] = info["finetune_history"][-1]["test_accuracy"]
    elif data is not None:
        accuracy["source"] = evaluate(model, data.test, mean=ckpt.mean, std=ckpt.std)
    if data is None and cfg.method != "none":
        log("no dataset given (--data or $CIFAR10_ROOT): exporting without reconstruction, "
            "BN recalibration or fine-tuning")
    if rounded_from_refit and not (data is not None and cfg.finetune_epochs):
        log(f"{TRAINED_BITS}-bit centroids rounded without fine-tuning: expect them to cost accuracy")
    return Compressed(model, ckpt, source, data, info, accuracy)


def export_compressed(c: Compressed, cfg: ExportConfig, out: Path, log=print):
    """Write `c` to ONNX with its manifest (centroids quantized first if cfg asks; `c` is kept)."""
    from export.manifest import versions
    from export.onnx_export import export_onnx

    from .io import sha256_of
    from .methods.first import int4_tables, quantize_centroids

    model, info, accuracy, ckpt, data = c.model, dict(c.info), dict(c.accuracy), c.ckpt, c.data
    if cfg.method == "first" and cfg.centroid_bits:
        import copy

        model = copy.deepcopy(model)
        info["centroid_bits"] = cfg.centroid_bits
        quantize_centroids(model, cfg.centroid_bits)
        if data is not None:
            accuracy["quantized"] = evaluate(model, data.test, mean=ckpt.mean, std=ckpt.std)
    model.eval()
    manifest = {
        "method": cfg.method, "ratio": None if cfg.method == "none" else cfg.ratio,
        "arch": ckpt.arch, "classes": list(ckpt.classes),
        "normalization": {"mean": list(ckpt.mean), "std": list(ckpt.std)},
        "source_checkpoint": {"path": str(c.source), "sha256": sha256_of(c.source)},
        "params": count_params(model), "macs": count_macs(model),
        "baseline": {"params": count_params(ckpt.model), "macs": count_macs(ckpt.model)},
        "accuracy": accuracy or None, "test_images": len(data.test) if data else 0,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "data", "out")},
        "finetune_epochs": cfg.finetune_epochs if data is not None and cfg.method != "none" else 0,
        **info, "versions": versions(),
    }
    result = export_onnx(model, out, manifest, check_inputs(ckpt, data), keep_structure=cfg.method == "first",
                         int4=int4_tables(model))
    log(f"wrote {out} ({result.manifest['model_bytes']:,} bytes); ONNX Runtime vs PyTorch "
        f"max abs difference {result.max_abs_diff:.2e}")
    return result


def run_export(cfg: ExportConfig, log=print, rank: int = 0, world_size: int = 1):
    """The whole export pipeline; returns export.onnx_export.ExportResult.

    Under torchrun every process compresses the same model and fine-tunes on its shard;
    rank 0 alone exports (the others return None).
    """
    if rank != 0:
        log = _quiet
    from export.onnx_export import check_output_path

    t0 = time.perf_counter()
    out = check_output_path(cfg.out) if cfg.out else None  # a bad path fails before any slow work
    ckpt, source = load_source(cfg)
    out = out or check_output_path(cfg.default_out(ckpt.arch))
    data = load_data(cfg.data, cfg.train_limit, cfg.test_limit, cfg.seed)
    compressed = compress_and_tune(cfg, ckpt, source, data, log, rank, world_size)
    if rank != 0:
        return None  # the model is the same in every process; rank 0 writes it
    result = export_compressed(compressed, cfg, out, log)
    log(f"export done in {time.perf_counter() - t0:.1f}s")
    return result
