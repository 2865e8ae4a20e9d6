"""The export pipeline over several methods and ratios against the baseline, resumable.

Each finished model adds a row to `results.json` at once, so an interrupted sweep starts
again where it stopped. Latency is measured at the end for all models in one interleaved
run against the baseline; eval/report.py then writes the tables and plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import ToolchainError
from .io import write_json
from .pipeline import ExportConfig, method_options, run_export


# Settings results.json did not always record, with the value a file without them was made with.
RECORDED_LATER = {"distill_features": 0.0, "distill_temperature": 4.0}


@dataclass
class SweepConfig:
    methods: tuple[str, ...] = ("first",)
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    out: str = "artifacts/report"
    export: ExportConfig = None  # everything else: checkpoint, data, fine-tuning, limits
    batch_sizes: tuple[int, ...] = (1, 256)
    repeats: int = 20
    trained_bits: tuple[int, ...] = ()  # method first: narrower centroids, each its own fine-tune (4)

    def __post_init__(self):
        if self.export is None:
            self.export = ExportConfig()
        from .methods.first import TRAINED_BITS
        self.trained_bits = tuple(dict.fromkeys(self.trained_bits))
        if set(self.trained_bits) - {TRAINED_BITS}:
            raise ToolchainError(f"centroids fine-tuned with their rounding have {TRAINED_BITS} bits, "
                                 f"got {self.trained_bits}")
        if self.trained_bits and "first" not in self.methods:
            raise ToolchainError("--centroid-bits adds rows of method first: sweep --method first too")


def row_allocation(row: dict) -> str:
    """How a row's model spread its filters over the layers (--allocation); uniform where not recorded."""
    return (row.get("options") or {}).get("allocation", "uniform")


def _slot(row: dict) -> str:
    """Which model a row is for (and so which file it writes): the allocation gives other shapes,
    so rows of two allocations stand side by side; other options replace each other."""
    return f"{row['method']}@{row['ratio']}@{row.get('centroid_bits')}@{row_allocation(row)}"


def _key(row: dict) -> str:
    """A row's slot and the method options it was made with: another option redoes just that row."""
    return _slot(row) + "@" + json.dumps(row.get("options", {}), sort_keys=True)


def _identity(cfg: ExportConfig) -> dict:
    """What a row is: method (baseline for none), ratio, centroid bits (method first only),
    and the method's own options (--features, --keep, ...)."""
    if cfg.method == "none":
        return {"method": "baseline", "ratio": 0.0, "centroid_bits": None, "options": {}}
    return {"method": cfg.method, "ratio": cfg.ratio,
            "centroid_bits": cfg.centroid_bits if cfg.method == "first" else None,
            "options": method_options(cfg.method, cfg.method_options)}


def _load_rows(path: Path, config: dict) -> list[dict]:
    """Rows of an earlier run of the same sweep configuration; another configuration is an error."""
    if not path.is_file():
        return []
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []  # a damaged results file is rebuilt
    previous = dict(earlier.get("config", {}).get("export", {}))
    options = previous.pop("method_options", {})  # recorded per row since; older files kept them here
    # A setting missing from an older file had the value of its time, which for the teacher settings
    # is not today's default; the others have not changed their default since they were recorded.
    before = {**asdict(ExportConfig(method="none")), **RECORDED_LATER}
    current = config["export"]
    teacherless = not previous.get("distill", True) and not current.get("distill", True)
    changed = sorted(k for k in set(previous) | set(current)
                     if previous.get(k, before.get(k)) != current.get(k, before.get(k))
                     and not (teacherless and k.startswith("distill_")))
    if previous and changed:
        raise ToolchainError(f"{path} holds results made with other settings ({', '.join(changed)}); "
                             "use another --out or remove that folder")
    rows = earlier.get("rows", [])
    for row in rows:
        row.setdefault("options", method_options(row["method"], options))
    return rows


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
    """The files one compressed model gives: method first with float and with int8 centroids
    (int8 rounding after a float fine-tune costs nothing measurable); narrower centroids are
    fine-tuned with their rounding, so they are a model, and a file, of their own."""
    if cfg.method == "first" and cfg.centroid_bits is None:
        return [cfg, replace(cfg, centroid_bits=8)]
    return [cfg]


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Export and evaluate every (method, ratio), then benchmark and write the report.

    Method first is exported twice from the same fine-tuned model (float and int8 centroids), and
    once more per `trained_bits` from a fine-tune of its own; when it is swept, ONNX Runtime's int8
    quantization of the baseline is added as its size peer. Every stage's accuracy is measured.
    """
    from eval.accuracy import evaluate_onnx
    from eval.bench import BenchConfig, bench, machine
    from eval.report import write_report
    from export.int8_peer import METHOD as INT8_PEER
    from export.int8_peer import quantize_int8

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
        write_json(results_path, {"config": _config_record(cfg), "rows": rows})

    plan = [replace(cfg.export, method="none", finetune_epochs=0)] + [
        replace(cfg.export, method=m, ratio=r) for m in cfg.methods for r in cfg.ratios] + [
        replace(cfg.export, method="first", ratio=r, centroid_bits=b)
        for b in cfg.trained_bits if "first" in cfg.methods for r in cfg.ratios]
    for export_cfg in plan:
        pending = [v for v in _variants(export_cfg) if _key(_identity(v)) not in done]
        if not pending:
            log(f"{_slot(_identity(export_cfg))}: already done, skipped")
            continue
        log("== baseline" if export_cfg.method == "none" else f"== {export_cfg.tag()}")
        compressed = compress_and_tune(export_cfg, ckpt, source, data, log)
        for variant in pending:
            path = out / "models" / f"{variant.tag()}.onnx"
            result = export_compressed(compressed, variant, path, log)
            add(path, result.manifest, _identity(variant))
    peer = {"method": INT8_PEER, "ratio": 0.0, "centroid_bits": None, "options": {}}
    if "first" in cfg.methods and _key(peer) not in done:
        log("== size peer: ONNX Runtime int8 weight quantization of the baseline")
        baseline = next(r["file"] for r in rows if r["method"] == "baseline")
        path = out / "models" / f"{INT8_PEER}.onnx"
        add(path, quantize_int8(baseline, path), peer)
    rows.sort(key=lambda r: (r["method"] != "baseline", r["method"], r["ratio"], r.get("centroid_bits") or 0))
    log("benchmarking all models, interleaved with the baseline")
    latency = bench([r["file"] for r in rows], BenchConfig(batch_sizes=cfg.batch_sizes, repeats=cfg.repeats))
    where = machine()
    baseline_macs = next(r["macs"] for r in rows if r["method"] == "baseline")
    for r in rows:
        r["bench_machine"] = where
        r["ideal_speedup"] = ideal_speedup(r, baseline_macs, where["channel_block"])
        for b in latency:
            if b["model"] == r["file"]:
                r[f"p50_ms_b{b['batch_size']}"] = b["p50_ms"]
                r[f"speedup_b{b['batch_size']}"] = b["speedup"]
                r[f"session_rss_bytes_b{b['batch_size']}"] = b["session_rss_bytes"]
    results = {"config": _config_record(cfg), "rows": rows}
    write_json(results_path, results)
    write_report(out, results)
    return results


def _config_record(cfg: SweepConfig) -> dict:
    """The settings every row shares. Not the methods and ratios: a sweep run again into the
    same folder with others adds rows, and the rows say what they are."""
    record = {k: v for k, v in asdict(cfg).items() if k not in ("methods", "ratios", "trained_bits", "out")}
    record["export"] = {k: v for k, v in record["export"].items()
                        if k not in ("out", "method", "ratio", "centroid_bits", "method_options", "stage_accuracy")}
    return record
