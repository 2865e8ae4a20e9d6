"""Sweep results -> results.csv, report.md and PNG plots (accuracy, size, latency, MACs, fine-tuning)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from toolchain.io import atomic_path

COLUMNS = ["method", "ratio", "centroid_bits", "inner_widths", "params", "macs", "model_bytes", "gzip_bytes",
           "accuracy_clustered", "accuracy_reconstructed", "accuracy_recalibrated", "accuracy_finetuned",
           "accuracy_quantized",
           "accuracy", "finetune_epochs", "p50_ms_b1", "p50_ms_b256", "speedup_b1", "speedup_b256",
           "ideal_speedup", "session_rss_bytes_b1", "test_images", "file"]
STAGES = [("accuracy_clustered", "clustered", ":"), ("accuracy_reconstructed", "reconstructed", "-."),
          ("accuracy_recalibrated", "BN recalibrated", "--"), ("accuracy", "final (ONNX Runtime)", "-")]


def write_report(out: str | Path, results: dict) -> None:
    out = Path(out)
    rows = results["rows"]
    _write_text(out / "results.csv", _csv(rows))
    plots = _plots(out, rows)
    _write_text(out / "report.md", _markdown(results, plots))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("/".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k)) for k in COLUMNS})
    return buf.getvalue()


def _label(row: dict) -> str:
    return row["method"] + (f" int{row['centroid_bits']}" if row.get("centroid_bits") else "")


def _series(rows, label):
    return sorted((r for r in rows if _label(r) == label), key=lambda r: r["ratio"])


def _plots(out: Path, rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == "baseline")
    methods = sorted({_label(r) for r in rows} - {"baseline"})
    figures = []

    def save(fig, name, title):
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        figures.append((name, title))

    def baseline_line(ax, value, label="baseline"):
        ax.axhline(value, color="black", lw=1, ls="--", label=label)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        series = _series(rows, m)
        for key, label, style in STAGES:
            pts = [(r["ratio"], 100 * r[key]) for r in series if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{m}: {label}")
    baseline_line(ax, 100 * base["accuracy"])
    ax.set(xlabel="ratio (fraction of filters removed)", ylabel="top-1 accuracy on the test split (%)",
           title="Accuracy against ratio")
    ax.legend(fontsize=7)
    save(fig, "accuracy.png", "Accuracy after each stage")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        series = _series(rows, m)
        ax.plot([r["ratio"] for r in series], [r["model_bytes"] / 1e3 for r in series], "-o", label=f"{m}: file")
        ax.plot([r["ratio"] for r in series], [r["gzip_bytes"] / 1e3 for r in series], "--o", label=f"{m}: gzipped")
    baseline_line(ax, base["model_bytes"] / 1e3, "baseline file")
    ax.set(xlabel="ratio (fraction of filters removed)", ylabel="ONNX file size (kB)", title="File size against ratio")
    ax.legend(fontsize=7)
    save(fig, "size.png", "ONNX file size")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in methods:
        series = _series(rows, m)
        ratios = [r["ratio"] for r in series]
        for b, style in ((1, "--o"), (256, "-o")):
            if series and f"p50_ms_b{b}" in series[0]:
                axes[0].plot(ratios, [r[f"p50_ms_b{b}"] for r in series], style, label=f"{m}: batch {b}")
                axes[1].plot(ratios, [r[f"speedup_b{b}"] for r in series], style, label=f"{m}: batch {b}")
        if any(r.get("ideal_speedup") for r in series):
            axes[1].plot(ratios, [r.get("ideal_speedup") for r in series], ":", color="gray",
                         label=f"{m}: ideal (padded MACs)")
    for b in (1, 256):
        if f"p50_ms_b{b}" in base:
            axes[0].axhline(base[f"p50_ms_b{b}"], color="black", lw=1, ls="--" if b == 1 else "-",
                            label=f"baseline batch {b}")
    axes[1].axhline(1.0, color="black", lw=1, ls="--", label="baseline")
    axes[0].set(xlabel="ratio", ylabel="median latency (ms)", yscale="log", title="ONNX Runtime CPU latency")
    axes[1].set(xlabel="ratio", ylabel="speed-up vs baseline (x)", title="Speed-up (same run, interleaved)")
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, "latency.png", "Latency and speed-up")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        series = _series(rows, m)
        ax.plot([r["ratio"] for r in series], [r["macs"] / 1e6 for r in series], "-o", label=m)
    baseline_line(ax, base["macs"] / 1e6)
    ax.set(xlabel="ratio (fraction of filters removed)", ylabel="multiply-adds per image (M)",
           title="Multiply-adds against ratio")
    ax.legend(fontsize=7)
    save(fig, "macs.png", "Multiply-adds")

    curves = [r for r in rows if r.get("finetune_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in curves:
            start = r.get("accuracy_reconstructed", r.get("accuracy_recalibrated"))
            ys = ([start] if start is not None else []) + r["finetune_curve"]
            xs = list(range(len(ys))) if start is not None else list(range(1, len(ys) + 1))
            ax.plot(xs, [100 * y for y in ys], "-o", label=f"{_label(r)} r={r['ratio']}")
        baseline_line(ax, 100 * base["accuracy"])
        ax.set(xlabel="fine-tuning epoch (0: before fine-tuning)", ylabel="test accuracy (%)",
               title="Fine-tuning curves")
        ax.legend(fontsize=7)
        save(fig, "finetune.png", "Fine-tuning curves")
    return figures


def _mb(v):
    return "" if v is None else f"{v / 1e6:.1f}"


def _pct(v):
    return "" if v is None else f"{100 * v:.2f}"


def _markdown(results: dict, plots: list[tuple[str, str]]) -> str:
    rows = results["rows"]
    base = next(r for r in rows if r["method"] == "baseline")
    export = results["config"]["export"]
    lines = ["# Filter-clustering sweep", "",
             f"Source: `{export.get('checkpoint') or 'shipped baseline'}`; test images: {base['test_images']}; "
             f"fine-tuning budget: {export['finetune_epochs']} epochs at peak lr {export['finetune_lr']}"
             f"{' with distillation from the original' if export['distill'] else ''}. Latency: ONNX Runtime CPU, "
             "median of interleaved repeats, speed-up against the baseline in the same run.", "",
             "| method | ratio | widths | params | MACs (M) | bytes | x base | clustered | recon. | recal. | final | "
             "p50 b1 ms | p50 b256 ms | speed-up b256 | ideal | session RAM b1 (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r.get("inner_widths") if r["method"] == "second" else None
        widths = "/".join(str(w[i * len(w) // 3]) for i in range(3)) if w else ""  # first block per stage
        ideal = f"{r['ideal_speedup']:.2f}" if r.get("ideal_speedup") else ""
        lines.append(
            f"| {_label(r)} | {r['ratio']:g} | {widths} | {r['params']:,} | {r['macs'] / 1e6:.2f} | "
            f"{r['model_bytes']:,} | {r['model_bytes'] / base['model_bytes']:.3f} | "
            f"{_pct(r.get('accuracy_clustered'))} | {_pct(r.get('accuracy_reconstructed'))} | "
            f"{_pct(r.get('accuracy_recalibrated'))} | {_pct(r['accuracy'])} | "
            f"{r.get('p50_ms_b1', float('nan')):.3f} | {r.get('p50_ms_b256', float('nan')):.2f} | "
            f"{r.get('speedup_b256', float('nan')):.2f} | {ideal} | {_mb(r.get('session_rss_bytes_b1'))} |")
    lines += ["", "Accuracies in %; *final* is the exported ONNX file under ONNX Runtime, after fine-tuning. "
              "Method first saves bytes on disk, not RAM: ONNX Runtime materialises the full conv weights "
              "when it folds the Gather at load. Method second saves both.", ""]
    for name, title in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)
