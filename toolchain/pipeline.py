"""checkpoint -> compress -> (recalibrate, fine-tune) -> ONNX export with output check -> manifest.

One function per step; `run_export` chains them and is what `toolchain export` calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from . import registry, settings
from .checkpoints import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from .cpu import channel_block
from .data import Split, load_split, to_tensor
from .errors import ToolchainError
from .methods import Calibration
from .models import count_macs, count_params
from .training import TrainConfig, evaluate, fit, recalibrate_bn

@dataclass
class ExportConfig:
    method: str = registry.METHODS[0].name  # a name in toolchain.registry
    ratio: float = settings.RATIO
    checkpoint: str | None = None  # None: the shipped baseline
    arch: str | None = None
    data: str | None = None  # None: $CIFAR10_ROOT, if set
    finetune_epochs: int = settings.FINETUNE_EPOCHS
    finetune_lr: float = settings.FINETUNE_LR
    distill: bool = True
    # The teacher's settings. None: the default with a teacher, off without one, so that --no-distill
    # alone turns them off while a value given without a teacher is refused.
    distill_features: float | None = None  # weight of the residual blocks' outputs matched to the original's
    distill_temperature: float | None = None  # softmax temperature of the logit distillation
    centroid_bits: int | None = None  # narrower storage where the method has it (first: 8 or 4)
    # "int8": the file is ONNX Runtime's static int8 (QDQ), calibrated on training images; with
    # fine-tuning, the fine-tune is quantization-aware (toolchain.quantization).
    quantize: str | None = None
    round_to: int | None = None  # methods that prune channels: multiple of kept widths; None: the CPU's block
    # Data-aware least-squares refit on calibration images (methods that have one), then BN
    # statistics moved to the data with the function kept (a plain recalibration would blur the
    # refit). False: no refit, BN statistics plainly recalibrated.
    reconstruct: bool = True
    calibration_images: int = settings.CALIBRATION_IMAGES
    # Also measure the model right after compression, before any refit or recalibration (the
    # report's stage plot): one more pass over the test images.
    stage_accuracy: bool = False
    train_limit: int | None = None  # subsets, for quick runs and tests
    test_limit: int | None = None
    seed: int = settings.SEED
    out: str | None = None
    # The method's own config (FirstConfig, SecondConfig, L1Config; None: its defaults). Its ratio,
    # seed and round_to are set from the fields above, so that one place decides them.
    options: object | None = None

    def __post_init__(self):
        spec = self.spec
        if spec.kind == registry.FILE:
            raise ToolchainError(f"{spec.name} transforms the baseline's ONNX file, it is not exported from a model")
        if spec.kind != registry.BASELINE and not 0 < self.ratio < 1:
            raise ToolchainError(f"ratio {self.ratio} is not between 0 and 1 (exclusive)")
        if self.finetune_epochs < 0:
            raise ToolchainError("--finetune-epochs must be 0 or more")
        self._resolve_distillation()
        self._resolve_options()
        if self.quantize is not None and self.quantize not in settings.QUANTIZE:
            raise ToolchainError(f"--quantize takes {', '.join(settings.QUANTIZE)}, got {self.quantize!r}")
        if self.quantize and not getattr(self.options, "int8_ready", True):
            raise ToolchainError(f"--quantize int8 is not available for {self.options.label} yet")
        if self.quantize and self.centroid_bits:
            raise ToolchainError("--quantize int8 rounds every weight itself: not with --centroid-bits")
        if self.centroid_bits is not None:
            impl = spec.implementation()
            if impl is None or impl.check_bits is None:
                raise ToolchainError(f"--centroid-bits is an option of method {' and '.join(registry.taking('centroid_bits'))}, "
                                     f"not of {spec.name}")
            impl.check_bits(self.centroid_bits)

    @property
    def spec(self) -> registry.Method:
        return registry.get(self.method)

    @property
    def implementation(self):
        return self.spec.implementation()

    def _resolve_options(self) -> None:
        """The method's config, with this config's ratio, seed and round_to: a bad option fails here,
        before any work."""
        impl = self.implementation
        if impl is None:
            self.options = None
            return
        options = self.options if self.options is not None else impl.config()
        if not isinstance(options, impl.config):
            raise ToolchainError(f"method {self.method} takes a {impl.config.__name__} as options, "
                                 f"got a {type(options).__name__}")
        shared = {"ratio": self.ratio, "seed": self.seed, "round_to": self.round_to or channel_block()}
        defaults = impl.config()
        for f in fields(options):  # a value set in the options that this config would silently override
            mine = getattr(options, f.name)
            if f.name in shared and mine not in (getattr(defaults, f.name), shared[f.name]):
                raise ToolchainError(f"set {f.name} on the export config, not in its options ({f.name}={mine})")
        own = {f.name for f in fields(options)}
        self.options = replace(options, **{k: v for k, v in shared.items() if k in own})

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
            self.distill_features = settings.DISTILL_FEATURES
        if self.distill_temperature is None:
            self.distill_temperature = settings.DISTILL_TEMPERATURE
        if not self.distill_features >= 0:  # NaN too
            raise ToolchainError(features_error)
        if not self.distill_temperature > 0:
            raise ToolchainError(temperature_error)

    @property
    def label(self) -> str | None:
        """What names the model in place of its ratio, where the method's config sets its size itself
        (kernel codebooks: kernel-layer256; weight clustering: c16); None where the ratio does."""
        return getattr(self.options, "label", None)

    def row_options(self) -> dict:
        """The options a user chose for the method (--features, --keep, --allocation), as result rows record them."""
        impl = self.implementation
        # None: an option that does not apply to this config (--reassign at filter granularity)
        chosen = {name: getattr(self.options, name) for name in impl.option_fields} if impl else {}
        return {name: value for name, value in chosen.items() if value is not None}

    def tag(self) -> str:
        """Short name of what this config makes: none, first_r0.5, first_r0.6_int8, second_r0.5_latency, ..."""
        if self.spec.is_baseline:
            return self.method + self._quantized_tag()
        allocation = getattr(self.options, "allocation", settings.UNIFORM)
        size = self.label or f"r{self.ratio:g}"
        return (f"{self.method}_{size}" + ("" if allocation == settings.UNIFORM else f"_{allocation}")
                + (f"_int{self.centroid_bits}" if self.centroid_bits else "") + self._quantized_tag())

    def _quantized_tag(self) -> str:
        return f"_q{self.quantize}" if self.quantize else ""

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


def compress(cfg: ExportConfig, ckpt: Checkpoint) -> tuple[torch.nn.Module, dict]:
    """Apply the configured method to a copy of the model; returns it and what was done."""
    import copy

    impl = cfg.implementation
    if impl is None:
        return copy.deepcopy(ckpt.model).eval(), {}
    model, info = impl.apply(ckpt.model.eval(), cfg.options)  # the methods work on a copy
    if hasattr(cfg.options, "round_to"):
        info["round_to"] = cfg.options.round_to
    return model, info


def reconstruct(model, ckpt: Checkpoint, data: Data, cfg: ExportConfig) -> list[dict]:
    """The method's least-squares refit on seeded calibration images from the training split."""
    def images(n: int, seed_offset: int):
        return to_tensor(data.train.subset(n, cfg.seed + seed_offset).images, ckpt.mean, ckpt.std)

    return cfg.implementation.refit(model, ckpt.model, Calibration(cfg.calibration_images, images))


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
    int8: object | None = None  # toolchain.quantization.Int8Simulation while the model simulates int8


def int8_calibration(cfg: ExportConfig, ckpt: Checkpoint, data: Data) -> torch.Tensor:
    """The seeded training images int8 activation ranges are taken over, in PyTorch and ONNX Runtime alike."""
    return to_tensor(data.train.subset(settings.INT8_CALIBRATION_IMAGES, cfg.seed + 2).images, ckpt.mean, ckpt.std)


def compress_and_tune(cfg: ExportConfig, ckpt: Checkpoint, source: Path, data: Data | None, log=print,
                      rank: int = 0, world_size: int = 1) -> Compressed:
    """Compress, then with data: refit (or recalibrate) and fine-tune, measuring each stage. With
    int8, the model simulates its int8 version from the fine-tune on (quantization-aware)."""
    from .quantization import simulate_int8

    impl = cfg.implementation
    model, info = compress(cfg, ckpt)
    accuracy = {}
    if cfg.quantize and data is None:
        raise ToolchainError(f"--quantize {cfg.quantize} calibrates on training images: give --data or set CIFAR10_ROOT")

    def measure(stage):
        if rank != 0:
            return  # only rank 0 reports; the others would evaluate the same model again
        accuracy[stage] = evaluate(model, data.test, mean=ckpt.mean, std=ckpt.std)
        log(f"accuracy {stage}: {accuracy[stage]:.4f}")

    rounded_from_refit = impl is not None and cfg.centroid_bits in impl.trained_bits
    if data is not None and impl is not None:
        if cfg.stage_accuracy:
            measure(impl.stage)
        refit = cfg.reconstruct and impl.refit is not None
        if refit:
            info["reconstruction"] = reconstruct(model, ckpt, data, cfg)
        if rounded_from_refit:
            # Rounded from here on: the statistics, the measurement and the fine-tune see the stored weights.
            impl.round_in_loop(model, cfg.centroid_bits)
        # After a refit the statistics move to the data while the function is kept (see recalibrate_bn).
        recalibrate_bn(model, data.train, seed=cfg.seed, mean=ckpt.mean, std=ckpt.std, keep_outputs=refit)
        measure("reconstructed" if refit else "recalibrated")
    elif data is not None:
        measure("source")
    sim = None
    if cfg.quantize:
        sim = simulate_int8(model)
        sim.calibrate(int8_calibration(cfg, ckpt, data))
        measure("int8_calibrated")  # post-training quantization, before any fine-tune
    if data is not None and cfg.finetune_epochs and (impl is not None or sim is not None):
        info["finetune_history"] = finetune(model, ckpt.model, ckpt, data, cfg, log, rank, world_size)
        accuracy["finetuned"] = info["finetune_history"][-1]["test_accuracy"]
        if sim is not None:
            sim.calibrate(int8_calibration(cfg, ckpt, data))  # the ranges the int8 file will have
            measure("int8_simulated")
    if data is None and impl is not None:
        log("no dataset given (--data or $CIFAR10_ROOT): exporting without reconstruction, "
            "BN recalibration or fine-tuning")
    if rounded_from_refit and not (data is not None and cfg.finetune_epochs):
        log(f"{cfg.centroid_bits}-bit weights rounded without fine-tuning: expect them to cost accuracy")
    if impl is not None and impl.strip:
        impl.strip(model)
    return Compressed(model, ckpt, source, data, info, accuracy, sim)


def export_compressed(c: Compressed, cfg: ExportConfig, out: Path, log=print):
    """Write `c` to ONNX with its manifest (centroids quantized first if cfg asks; `c` is kept, except
    that an int8 simulation ends here: the float model is exported, then quantized)."""
    from export.manifest import versions
    from export.onnx_export import export_onnx

    from .io import sha256_of

    impl = cfg.implementation
    model, info, accuracy, ckpt, data = c.model, dict(c.info), dict(c.accuracy), c.ckpt, c.data
    if cfg.centroid_bits:
        import copy

        model = copy.deepcopy(model)
        info["centroid_bits"] = cfg.centroid_bits
        impl.store_bits(model, cfg.centroid_bits)
        if data is not None:
            accuracy["quantized"] = evaluate(model, data.test, mean=ckpt.mean, std=ckpt.std)
    int4 = impl.four_bit(model) if impl is not None and impl.four_bit else ()
    model.eval()
    check = check_inputs(ckpt, data, 256 if c.int8 is not None else 64)
    simulated = None
    if c.int8 is not None:
        with torch.no_grad():
            simulated = model(check).numpy()  # what the int8 file must give
        c.int8.remove()
        c.int8 = None
    manifest = {
        "method": cfg.method, "ratio": None if impl is None else cfg.ratio,
        "arch": ckpt.arch, "classes": list(ckpt.classes),
        "normalization": {"mean": list(ckpt.mean), "std": list(ckpt.std)},
        "source_checkpoint": {"path": str(c.source), "sha256": sha256_of(c.source)},
        "params": count_params(model), "macs": count_macs(model),
        "baseline": {"params": count_params(ckpt.model), "macs": count_macs(ckpt.model)},
        "accuracy": accuracy or None, "test_images": len(data.test) if data else 0,
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "data", "out")},
                   "method_options": cfg.row_options()},
        "finetune_epochs": cfg.finetune_epochs if data is not None and info.get("finetune_history") else 0,
        **info, "versions": versions(),
    }
    keep_structure = impl is not None and impl.shared_weights
    if simulated is None:
        result = export_onnx(model, out, manifest, check, keep_structure=keep_structure, int4=int4)
    else:
        result = _export_int8(model, out, manifest, check, simulated, int8_calibration(cfg, ckpt, data), keep_structure,
                              data.test)
    log(f"wrote {out} ({result.manifest['model_bytes']:,} bytes); ONNX Runtime vs PyTorch "
        f"max abs difference {result.max_abs_diff:.2e}")
    return result


def _export_int8(model, out: Path, manifest: dict, check: torch.Tensor, simulated, calibration: torch.Tensor,
                 keep_structure: bool, test: Split):
    """The float model to ONNX (checked against PyTorch as any export), then to static int8, checked
    against the PyTorch model that simulated it: their top-1 classes agree on INT8_AGREEMENT of the check
    images or nothing is written. The float model's agreement with the int8 file is recorded beside, and
    the int8 file's own accuracy on the test images (ONNX Runtime) as accuracy.onnx_int8."""
    import tempfile

    from eval.accuracy import evaluate_onnx
    from export.int8_static import agreement, quantize_int8
    from export.onnx_export import ExportResult, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        float_file = export_onnx(model, Path(tmp) / "float.onnx", manifest, check, keep_structure=keep_structure)
        with torch.no_grad():
            float_logits = model(check).numpy()
        report, accuracy = {}, dict(manifest["accuracy"] or {})

        def verify(path):
            report.update(agreement(path, check.numpy(), simulated, float_logits))
            accuracy["onnx_int8"] = evaluate_onnx(path, test)["accuracy"]

        full = quantize_int8(float_file.path, out, calibration.numpy(),
                             {**manifest, "float_check_max_abs_diff": float_file.max_abs_diff}, verify=verify,
                             extra=lambda: {"int8_check": report, "accuracy": accuracy})
    return ExportResult(out, report["max_abs_diff_simulated"], full)


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
