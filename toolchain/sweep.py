"""The export pipeline over several methods and ratios against the baseline, resumable.

Each finished model adds a row to `results.json` at once (schema: toolchain.results), so an
interrupted sweep starts again where it stopped. Latency is measured at the end for all models
in one interleaved run against the baseline; eval/report.py then writes the tables and plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import registry, settings
from .errors import ToolchainError
from .io import write_json
from .pipeline import ExportConfig
from .results import SCHEMA, baseline_row, method_of, row_allocation, upgrade


@dataclass
class SweepConfig:
    methods: tuple[str, ...] = (registry.METHODS[0].name,)
    ratios: tuple[float, ...] = settings.SWEEP_RATIOS
    out: str = settings.SWEEP_OUT
    export: ExportConfig = None  # everything else: checkpoint, data, fine-tuning, limits
    # Each method's own config (FirstConfig, SecondConfig, ...) by method name; absent: its defaults.
    options: dict = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = settings.SWEEP_BATCH_SIZES
    repeats: int = settings.SWEEP_REPEATS
    # More models, each exported once: (method name, its config), a config that names its own size
    # (`label`, e.g. method first's kernel codebooks "kernel-layer256"), which the ratios do not vary.
    sized: tuple[tuple[str, object], ...] = ()
    trained_bits: tuple[int, ...] = ()  # narrower storage fine-tuned with its rounding, each its own model (4)
    quantize: tuple[str, ...] = ()  # "int8": every model (the baseline too) again as static int8, fine-tuned for it

    def __post_init__(self):
        if self.export is None:
            self.export = ExportConfig(method=registry.baseline().name)
        for name in self.methods:
            if registry.get(name).kind != registry.MODEL:
                raise ToolchainError(f"a sweep compresses models: {name} is not a method to sweep")
        for name, options in self.sized:
            if registry.get(name).kind != registry.MODEL or not getattr(options, "label", None):
                raise ToolchainError(f"a model of its own size takes a method and a config with a label, got {name}")
        for name, options in self.options.items():
            if name not in self.methods:
                raise ToolchainError(f"options given for method {name}, which this sweep does not sweep")
            config = _implementation(name).config
            if options is not None and not isinstance(options, config):
                raise ToolchainError(f"method {name} takes a {config.__name__} as options, got a {type(options).__name__}")
        self.trained_bits = tuple(dict.fromkeys(self.trained_bits))
        self.quantize = tuple(dict.fromkeys(self.quantize))
        takers = [m for m in self.methods if _implementation(m).trained_bits]
        allowed = {b for m in takers for b in _implementation(m).trained_bits}
        every = {b for m in registry.taking("centroid_bits") for b in _implementation(m).trained_bits}
        if set(self.trained_bits) - every:
            raise ToolchainError(f"centroids fine-tuned with their rounding have {' or '.join(map(str, sorted(every)))} "
                                 f"bits, got {self.trained_bits}")
        if set(self.trained_bits) - allowed:
            takers = " and ".join(registry.taking("centroid_bits"))
            raise ToolchainError(f"--centroid-bits adds rows of method {takers}: sweep --method {takers} too")


def _implementation(name: str):
    return registry.get(name).implementation()


def _slot(row: dict) -> str:
    """Which model a row is for (and so which file it writes): the allocation gives other shapes,
    so rows of two allocations stand side by side; other options replace each other."""
    quantized = f"@{row['quantize']}" if row.get("quantize") else ""  # rows before int8 had none
    size = row.get("label") or row["ratio"]  # rows before labels had none
    return f"{row['method']}@{size}@{row.get('centroid_bits')}@{row_allocation(row)}{quantized}"


def _key(row: dict) -> str:
    """A row's slot and the method options it was made with: another option redoes just that row."""
    return _slot(row) + "@" + json.dumps(row.get("options", {}), sort_keys=True)


def _identity(cfg: ExportConfig) -> dict:
    """What a row is: method, ratio (0 for the baseline and for configs that name their own size, by
    `label`), narrower storage, and the method's own options (--features, --keep, ...)."""
    has_ratio = cfg.implementation is not None and cfg.label is None
    return {"method": cfg.method, "ratio": cfg.ratio if has_ratio else 0.0, "label": cfg.label,
            "centroid_bits": cfg.centroid_bits, "quantize": cfg.quantize, "options": cfg.row_options()}


def _load_rows(path: Path, config: dict) -> list[dict]:
    """Rows of an earlier run of the same sweep configuration; another configuration is an error."""
    if not path.is_file():
        return []
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []  # a damaged results file is rebuilt
    earlier = upgrade(earlier)  # a newer schema is refused, never overwritten
    previous, current = earlier["config"].get("export", {}), config["export"]
    defaults = asdict(ExportConfig(method=registry.baseline().name))  # for settings added since
    teacherless = not previous.get("distill", True) and not current.get("distill", True)
    changed = sorted(k for k in set(previous) | set(current)
                     if previous.get(k, defaults.get(k)) != current.get(k, defaults.get(k))
                     and not (teacherless and k.startswith("distill_")))
    if previous and changed:
        raise ToolchainError(f"{path} holds results made with other settings ({', '.join(changed)}); "
                             "use another --out or remove that folder")
    return earlier.get("rows", [])


def _row(path, manifest: dict, identity: dict, onnx_eval: dict) -> dict:
    m = manifest
    acc = m.get("accuracy") or {}
    return {**identity,
            "file": str(path), "arch": m["arch"], "params": m["params"], "macs": m["macs"],
            "model_bytes": m["model_bytes"], "gzip_bytes": m["gzip_bytes"],
            "inner_widths": m.get("inner_widths"), "finetune_epochs": m.get("finetune_epochs", 0),
            **{f"accuracy_{stage}": value for stage, value in acc.items()},
            "accuracy": onnx_eval["accuracy"], "test_images": onnx_eval["images"],
            "finetune_curve": [r["test_accuracy"] for r in m.get("finetune_history", [])]}


def ideal_speedup(row: dict, baseline_macs: int, block: int) -> float | None:
    """Baseline multiply-adds over the model's, with block widths padded to the benchmarking
    CPU's channel block (a width of 8 costs what 16 costs with AVX-512): the speed-up to approach."""
    widths = row.get("inner_widths")
    if not widths:
        return None
    from .methods.second import padded_widths
    from .models import build_model, count_macs
    arch = row.get("arch", "resnet20")  # rows written before the arch was recorded: ResNet20
    padded = padded_widths(widths, build_model(arch).inner_widths(), block)
    return baseline_macs / count_macs(build_model(arch, inner_widths=padded))


def _variants(cfg: ExportConfig) -> list[ExportConfig]:
    """The files one compressed model gives: as it is and, where the method has narrower storage
    that needs no training of its own (first: int8 centroids), in that storage too. Storage fine-tuned
    with its rounding is a model, and a file, of its own."""
    impl = cfg.implementation
    if impl is None or cfg.centroid_bits is not None or cfg.quantize:
        return [cfg]
    return [cfg] + [replace(cfg, centroid_bits=bits) for bits in impl.sweep_bits]


def _plan(cfg: SweepConfig) -> list[ExportConfig]:
    """The baseline, every method at every ratio (once, where its config names its own size), the models
    of their own size, then the narrower storages trained on their own, then each of those models
    quantized (the baseline fine-tuned for it like the others)."""
    def export(method: str, options=None, **changes) -> ExportConfig:
        return replace(cfg.export, method=method, options=options or cfg.options.get(method), **changes)

    def at_ratios(method: str) -> list[ExportConfig]:
        once = export(method)
        return [once] if once.label else [export(method, ratio=r) for r in cfg.ratios]

    models = [c for m in cfg.methods for c in at_ratios(m)] + [export(m, o) for m, o in cfg.sized]
    return ([export(registry.baseline().name, finetune_epochs=0)] + models
            + [replace(c, centroid_bits=b) for b in cfg.trained_bits for c in models
               if b in c.implementation.trained_bits]
            + [replace(c, quantize=q) for q in cfg.quantize for c in [export(registry.baseline().name)] + models
               if getattr(c.options, "int8_ready", True)])


def _file_peers(methods: tuple[str, ...]) -> list[registry.Method]:
    """Peers made from the baseline's file (no training) of the swept methods: swept beside them."""
    peers = [registry.get(p) for m in methods for p in registry.get(m).peers]
    return list(dict.fromkeys(p for p in peers if p.kind == registry.FILE))


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Export and evaluate every (method, ratio), then benchmark and write the report.

    A method with narrower storage is exported in it too from the same fine-tuned model (method
    first: float and int8 centroids), and once more per `trained_bits` from a fine-tune of its own;
    a method's peer made from the baseline's file (first's: ONNX Runtime's int8 quantization) is
    added beside it. Every stage's accuracy is measured.
    """
    from eval.accuracy import evaluate_onnx
    from eval.bench import BenchConfig, bench
    from eval.report import write_report

    from .cpu import machine
    from .pipeline import compress_and_tune, export_compressed, load_data, load_source

    cfg = replace(cfg, export=replace(cfg.export, stage_accuracy=True))  # the report plots every stage
    out = Path(cfg.out)
    results_path = out / "results.json"
    rows = _load_rows(results_path, _config_record(cfg))
    done = {_key(r) for r in rows if Path(r["file"]).is_file()}
    rows = [r for r in rows if _key(r) in done]
    data = load_data(cfg.export.data, cfg.export.train_limit, cfg.export.test_limit, cfg.export.seed)
    if data is None:
        raise ToolchainError("a sweep measures accuracy: give --data or set CIFAR10_ROOT")
    ckpt, source = load_source(cfg.export)

    def add(path, manifest, identity):
        rows[:] = [r for r in rows if _slot(r) != _slot(identity)]  # made with other options
        rows.append(_row(path, manifest, identity, evaluate_onnx(path, data.test)))
        done.add(_key(identity))
        write_json(results_path, _results(cfg, rows))

    for export_cfg in _plan(cfg):
        pending = [v for v in _variants(export_cfg) if _key(_identity(v)) not in done]
        if not pending:
            log(f"{_slot(_identity(export_cfg))}: already done, skipped")
            continue
        log(f"== {export_cfg.spec.display if export_cfg.spec.is_baseline and not export_cfg.quantize else export_cfg.tag()}")
        compressed = compress_and_tune(export_cfg, ckpt, source, data, log)
        for variant in pending:
            path = out / "models" / f"{variant.tag()}.onnx"
            result = export_compressed(compressed, variant, path, log)
            add(path, result.manifest, _identity(variant))
    for peer in _file_peers(cfg.methods):
        identity = {"method": peer.name, "ratio": 0.0, "label": None, "centroid_bits": None, "options": {}}
        if _key(identity) in done:
            continue
        log(f"== peer: {peer.summary}")
        path = out / "models" / f"{peer.name}.onnx"
        add(path, peer.implementation().from_file(baseline_row(rows)["file"], path, peer.name), identity)
    rows.sort(key=lambda r: (not method_of(r).is_baseline, r["method"], r["ratio"], r.get("label") or "",
                             r.get("centroid_bits") or 0, r.get("quantize") or ""))
    log("benchmarking all models, interleaved with the baseline")
    latency = bench([r["file"] for r in rows], BenchConfig(batch_sizes=cfg.batch_sizes, repeats=cfg.repeats))
    where = machine()
    baseline_macs = baseline_row(rows)["macs"]
    for r in rows:
        r["bench_machine"] = where
        r["ideal_speedup"] = ideal_speedup(r, baseline_macs, where["channel_block"])
        for b in latency:
            if b["model"] == r["file"]:
                r[f"p50_ms_b{b['batch_size']}"] = b["p50_ms"]
                r[f"speedup_b{b['batch_size']}"] = b["speedup"]
                r[f"session_rss_bytes_b{b['batch_size']}"] = b["session_rss_bytes"]
    results = _results(cfg, rows)
    write_json(results_path, results)
    write_report(out, results)
    return results


def _results(cfg: SweepConfig, rows: list[dict]) -> dict:
    return {"schema": SCHEMA, "config": _config_record(cfg), "rows": rows}


def _config_record(cfg: SweepConfig) -> dict:
    """The settings every row shares. Not the methods, ratios and method options: a sweep run again
    into the same folder with others adds rows, and the rows say what they are."""
    record = {k: v for k, v in asdict(cfg).items()
              if k not in ("methods", "ratios", "sized", "trained_bits", "quantize", "out", "options")}
    record["export"] = {k: v for k, v in record["export"].items()
                        if k not in ("out", "method", "ratio", "centroid_bits", "quantize", "options", "stage_accuracy")}
    return record
