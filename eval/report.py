"""Sweep results -> results.csv, report.md and PNG plots (accuracy, size, latency, MACs, fine-tuning, peers)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from toolchain.io import atomic_path
from toolchain.sweep import row_allocation

COLUMNS = ["method", "ratio", "centroid_bits", "options", "inner_widths", "params", "macs", "model_bytes", "gzip_bytes",
           "accuracy_clustered", "accuracy_pruned", "accuracy_reconstructed", "accuracy_recalibrated", "accuracy_finetuned",
           "accuracy_quantized",
           "accuracy", "finetune_epochs", "p50_ms_b1", "p50_ms_b256", "speedup_b1", "speedup_b256",
           "ideal_speedup", "session_rss_bytes_b1", "test_images", "file"]
INT8_PEER = "int8-dynamic"  # export.int8_peer.METHOD: one file, no ratio
STAGES = [("accuracy_clustered", "clustered", ":"), ("accuracy_pruned", "pruned", ":"), ("accuracy_reconstructed", "reconstructed", "-."),
          ("accuracy_recalibrated", "BN recalibrated", "--"), ("accuracy", "final (ONNX Runtime)", "-")]


def write_report(out: str | Path, results: dict) -> None:
    out = Path(out)
    rows = results["rows"]
    _write_text(out / "results.csv", _csv(rows))
    plots = _plots(out, rows)
    peer_plots = dict(_peer_plots(out, rows))  # shown in the peer sections, beside their tables
    _write_text(out / "report.md", "\n".join([_markdown(results, plots), _allocation_markdown(rows),
                                               _peer_markdown(rows, peer_plots)]))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("/".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k)) for k in COLUMNS}
                        | {"options": _options(r)})
    return buf.getvalue()


def _options(row: dict) -> str:
    """The method options a row was made with, e.g. keep=salient."""
    return " ".join(f"{k}={v}" for k, v in sorted((row.get("options") or {}).items()))


def _stage_widths(row: dict) -> str:
    """Inner widths of the first block of each stage, e.g. 8/16/32; empty for unpruned models."""
    w = row.get("inner_widths")
    return "/".join(str(w[i * len(w) // 3]) for i in range(3)) if w else ""


def _label(row: dict) -> str:
    """The series a row belongs to: method, a non-uniform allocation, int8 centroids."""
    allocation = row_allocation(row)
    return (row["method"] + ("" if allocation == "uniform" else f" {allocation}")
            + (f" int{row['centroid_bits']}" if row.get("centroid_bits") else ""))


def _series(rows, label):
    return sorted((r for r in rows if _label(r) == label), key=lambda r: r["ratio"])


def _plots(out: Path, rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == "baseline")
    methods = sorted({_label(r) for r in rows} - {"baseline", INT8_PEER})
    figures = []
    save = _saver(out, figures)

    color = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method, a line style per stage
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        series = _series(rows, m)
        for key, label, style in STAGES:
            pts = [(r["ratio"], 100 * r[key]) for r in series if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=color[m], label=f"{m}: {label}")
    baseline_line(ax, 100 * base["accuracy"])
    ax.set(xlabel="ratio (fraction of filters removed)", ylabel="top-1 accuracy on the test split (%)",
           title="Accuracy against ratio")
    ax.legend(fontsize=7)
    save(fig, "accuracy.png", "Accuracy after each stage")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        series = _series(rows, m)
        ax.plot([r["ratio"] for r in series], [r["model_bytes"] / 1e3 for r in series], "-o", color=color[m],
                label=f"{m}: file")
        ax.plot([r["ratio"] for r in series], [r["gzip_bytes"] / 1e3 for r in series], "--o", color=color[m],
                label=f"{m}: gzipped")
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
                axes[0].plot(ratios, [r[f"p50_ms_b{b}"] for r in series], style, color=color[m], label=f"{m}: batch {b}")
                axes[1].plot(ratios, [r[f"speedup_b{b}"] for r in series], style, color=color[m],
                             label=f"{m}: batch {b}")
        if any(r.get("ideal_speedup") for r in series):
            axes[1].plot(ratios, [r.get("ideal_speedup") for r in series], ":", color=color[m],
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
        ax.plot([r["ratio"] for r in series], [r["macs"] / 1e6 for r in series], "-o", color=color[m], label=m)
    baseline_line(ax, base["macs"] / 1e6)
    ax.set(xlabel="ratio (fraction of filters removed)", ylabel="multiply-adds per image (M)",
           title="Multiply-adds against ratio")
    ax.legend(fontsize=7)
    save(fig, "macs.png", "Multiply-adds")

    curves = [r for r in rows if r.get("finetune_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in curves:
            start = _before_finetuning(r)
            ys = ([start] if start is not None else []) + r["finetune_curve"]
            xs = list(range(len(ys))) if start is not None else list(range(1, len(ys) + 1))
            ax.plot(xs, [100 * y for y in ys], "-o", label=f"{_label(r)} r={r['ratio']}")
        baseline_line(ax, 100 * base["accuracy"])
        ax.set(xlabel="fine-tuning epoch (0: before fine-tuning)", ylabel="test accuracy (%)",
               title="Fine-tuning curves")
        ax.legend(fontsize=7)
        save(fig, "finetune.png", "Fine-tuning curves")
    return figures


def _saver(out: Path, figures: list):
    import matplotlib.pyplot as plt

    def save(fig, name, title):
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        figures.append((name, title))
    return save


def baseline_line(ax, value, label="baseline"):
    ax.axhline(value, color="black", lw=1, ls="--", label=label)


def _before_finetuning(row: dict):
    return row.get("accuracy_reconstructed", row.get("accuracy_recalibrated"))


def accuracy_after(row: dict, epochs: int):
    """Test accuracy after `epochs` fine-tuning epochs (0: before), read off the row's one run."""
    if epochs == 0:
        return _before_finetuning(row)
    curve = row.get("finetune_curve") or []
    return curve[epochs - 1] if len(curve) >= epochs else None


def structural_pairs(rows: list[dict]) -> list[tuple[float, dict, dict]]:
    """(ratio, method second's row, the L1 peer's row) wherever both were swept with the same widths."""
    peers = {r["ratio"]: r for r in rows if r["method"] == "l1"}
    return [(r["ratio"], r, peers[r["ratio"]]) for r in rows if _label(r) == "second" and r["ratio"] in peers]


def allocation_groups(rows: list[dict]) -> list[tuple[float, list[dict]]]:
    """(ratio, method second's rows of every allocation) where more than one allocation was swept:
    the same multiply-add budget spent on other widths."""
    by_ratio = {}
    for r in rows:
        if r["method"] == "second":
            by_ratio.setdefault(r["ratio"], []).append(r)
    return [(ratio, sorted(group, key=lambda r: row_allocation(r) != "uniform"))  # uniform first
            for ratio, group in sorted(by_ratio.items()) if len(group) > 1]

def size_rows(rows: list[dict]) -> tuple[dict | None, list[dict]]:
    """The int8 size peer's row and method first's rows (float, int8 and 4-bit centroids)."""
    peer = next((r for r in rows if r["method"] == INT8_PEER), None)
    return peer, [r for r in rows if r["method"] == "first"]


def _peer_plots(out: Path, rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == "baseline")
    figures = []
    save = _saver(out, figures)
    pairs = structural_pairs(rows)
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.2), squeeze=False)
        for ax, (ratio, second, l1) in zip(axes[0], pairs):
            for row, label in ((second, "method second"), (l1, "L1 pruning (Torch-Pruning)")):
                pts = [(e, 100 * a) for e in range(len(row["finetune_curve"]) + 1)
                       if (a := accuracy_after(row, e)) is not None]
                ax.plot(*zip(*pts), "-o", label=label)
            baseline_line(ax, 100 * base["accuracy"])
            ax.set(xlabel="fine-tuning epochs (0: before fine-tuning)", ylabel="test accuracy (%)",
                   title=f"ratio {ratio:g}, widths {_stage_widths(second)}")
            ax.legend(fontsize=7)
        save(fig, "peer_structural.png", "Method second against L1-norm pruning")
    peer, firsts = size_rows(rows)
    if peer and firsts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for bits in sorted({r.get("centroid_bits") or 32 for r in firsts}, reverse=True):
            bits, label = (None, "method first, float centroids") if bits == 32 else \
                (bits, f"method first, {bits}-bit centroids")
            series = sorted((r for r in firsts if r.get("centroid_bits") == bits), key=lambda r: r["model_bytes"])
            if series:
                ax.plot([r["model_bytes"] / 1e3 for r in series], [100 * r["accuracy"] for r in series], "-o", label=label)
                for r in series:
                    ax.annotate(f"r{r['ratio']:g}", (r["model_bytes"] / 1e3, 100 * r["accuracy"]), fontsize=7,
                                textcoords="offset points", xytext=(4, -10))
        ax.plot([peer["model_bytes"] / 1e3], [100 * peer["accuracy"]], "s", color="red",
                label="baseline, ONNX Runtime int8 weights")
        ax.plot([base["model_bytes"] / 1e3], [100 * base["accuracy"]], "*", color="black", ms=12, label="baseline")
        ax.set(xscale="log", xlabel="ONNX file size (kB, log scale)", ylabel="test accuracy (%)",
               title="Accuracy against file size")
        ax.legend(fontsize=7)
        save(fig, "peer_size.png", "Method first against int8 quantization")
    return figures


def _peer_markdown(rows: list[dict], plots: dict[str, str]) -> str:
    base = next(r for r in rows if r["method"] == "baseline")
    lines = []
    pairs = structural_pairs(rows)
    if pairs:
        lines += ["## Method second against L1-norm pruning", "",
                  "The L1 peer (`--method l1`) prunes the same block-conv1 channels to the same widths with "
                  "Torch-Pruning (smallest filter L1 norms go), then gets the same BN recalibration and the very "
                  "same fine-tuning (schedule, epochs, learning rate, distillation). Budgets 1, 3, 5 are the test "
                  "accuracies after those epochs of one run of the stated schedule; 0 is before fine-tuning.", "",
                  "| ratio | epochs | second | L1 peer | second - L1 (points) |", "|---|---|---|---|---|"]
        behind = []
        for ratio, second, l1 in pairs:
            for epochs in sorted({0, 1, 3, 5, len(second["finetune_curve"])}):
                a, b = accuracy_after(second, epochs), accuracy_after(l1, epochs)
                if a is None or b is None:
                    continue
                lines.append(f"| {ratio:g} | {epochs} | {_pct(a)} | {_pct(b)} | {100 * (a - b):+.2f} |")
                if a < b:
                    behind.append(f"ratio {ratio:g} after {epochs} epoch{'' if epochs == 1 else 's'}")
            lines.append(f"| {ratio:g} | ONNX Runtime | {_pct(second['accuracy'])} | {_pct(l1['accuracy'])} | "
                         f"{100 * (second['accuracy'] - l1['accuracy']):+.2f} |")
        lines += ["", "**Who wins:** " + ("method second is at least as accurate as the L1 peer at every budget "
                                          "measured." if not behind else
                                          "the L1 peer is ahead at " + ", ".join(behind) + "; method second "
                                          "everywhere else."), ""]
        lines += [f"![{plots['peer_structural.png']}](peer_structural.png)", ""]
    peer, firsts = size_rows(rows)
    if peer and firsts:
        lines += ["## Method first against int8 weight quantization", "",
                  "The size peer is ONNX Runtime's `quantize_dynamic` (int8 weights, activations quantized at run "
                  "time, no fine-tuning) on the baseline ONNX file.", "",
                  "| model | bytes | x base | accuracy | p50 b1 ms | speed-up b256 |", "|---|---|---|---|---|---|"]
        for r in [peer] + sorted(firsts, key=lambda r: r["model_bytes"], reverse=True):
            name = "baseline int8 (ONNX Runtime)" if r is peer else f"{_label(r)} r{r['ratio']:g}"
            lines.append(f"| {name} | {r['model_bytes']:,} | {r['model_bytes'] / base['model_bytes']:.3f} | "
                         f"{_pct(r['accuracy'])} | {r.get('p50_ms_b1', float('nan')):.3f} | "
                         f"{r.get('speedup_b256', float('nan')):.2f} |")
        wins = [r for r in firsts if r["model_bytes"] < peer["model_bytes"] and r["accuracy"] >= peer["accuracy"]]
        smaller = [r for r in firsts if r["model_bytes"] < peer["model_bytes"]]
        if wins:
            verdict = ("method first wins at " + ", ".join(f"{_label(r)} r{r['ratio']:g}" for r in wins)
                       + ": a smaller file at no worse accuracy, and the float runtime.")
        elif smaller:
            best = max(smaller, key=lambda r: r["accuracy"])
            verdict = (f"the int8 peer wins on accuracy at its size: every smaller method-first file is less "
                       f"accurate (best: {_label(best)} r{best['ratio']:g}, {_pct(best['accuracy'])}% in "
                       f"{best['model_bytes']:,} bytes against {_pct(peer['accuracy'])}% in {peer['model_bytes']:,}).")
        else:
            verdict = "the int8 peer wins: no method-first file here is smaller."
        lines += ["", f"**Who wins:** {verdict} The peer's speed is its weak side: its speed-up at batch 256 is "
                  f"{peer.get('speedup_b256', float('nan')):.2f}x the float baseline.", "",
                  f"![{plots['peer_size.png']}](peer_size.png)", ""]
    return "\n".join(lines)


def _allocation_markdown(rows: list[dict]) -> str:
    groups = allocation_groups(rows)
    if not groups:
        return ""
    base = next(r for r in rows if r["method"] == "baseline")
    lines = ["## Method second: the same multiply-adds on other widths", "",
             "`--allocation latency` keeps uniform widths' multiply-add budget but picks per-stage widths that "
             "cost the CPU least once padded to its channel block (a width below the block costs the whole "
             "block).", "", "| ratio | allocation | widths | MACs (x base) | final | speed-up b1 | speed-up b256 | ideal |"
             " b256 / ideal |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for ratio, group in groups:
        for r in group:
            speedup, ideal = r.get("speedup_b256"), r.get("ideal_speedup")
            lines.append(f"| {ratio:g} | {row_allocation(r)} | {_stage_widths(r)} | "
                         f"{r['macs'] / base['macs']:.3f} | {_pct(r['accuracy'])} | {r.get('speedup_b1', float('nan')):.2f} | "
                         f"{speedup or float('nan'):.2f} | {ideal or float('nan'):.2f} | "
                         f"{speedup / ideal if speedup and ideal else float('nan'):.2f} |")
        fastest = max(group, key=lambda r: r.get("speedup_b256") or 0)
        verdicts += ["", f"**Fastest at ratio {ratio:g}** ({fastest['macs'] / base['macs']:.3f}x the baseline's "
                     f"multiply-adds): {row_allocation(fastest)}, {fastest.get('speedup_b256', float('nan')):.2f}x at "
                     f"batch 256 against an ideal {fastest.get('ideal_speedup') or float('nan'):.2f}x, at "
                     f"{_pct(fastest['accuracy'])}% accuracy."]
    return "\n".join(lines + verdicts + [""])


def _mb(v):
    return "" if v is None else f"{v / 1e6:.1f}"


def _pct(v):
    return "" if v is None else f"{100 * v:.2f}"


def _machines(rows: list[dict]) -> str:
    """Where the latencies were measured: one CPU when all rows were benchmarked in one run."""
    seen = sorted({json.dumps(r["bench_machine"], sort_keys=True) for r in rows if r.get("bench_machine")})
    if not seen:
        return "machine not recorded"
    return "; ".join(f"measured on {m['cpu']}, {m['cores']} cores, ONNX Runtime {m['onnxruntime']}, "
                     f"channel block {m['channel_block']}" for m in map(json.loads, seen))


def _distillation(export: dict) -> str:
    if not export["distill"]:
        return ""
    features = export.get("distill_features") or 0  # reports made before the term existed have none
    blocks = f", residual block outputs at weight {features:g}" if features else ""
    return f" with distillation from the original (logits at temperature {export['distill_temperature']:g}{blocks})"


def _markdown(results: dict, plots: list[tuple[str, str]]) -> str:
    rows = results["rows"]
    base = next(r for r in rows if r["method"] == "baseline")
    export = results["config"]["export"]
    lines = ["# Filter-clustering sweep", "",
             f"Source: `{export.get('checkpoint') or 'shipped baseline'}`; test images: {base['test_images']}; "
             f"fine-tuning budget: {export['finetune_epochs']} epochs at peak lr {export['finetune_lr']}"
             f"{_distillation(export)}. Latency: ONNX Runtime CPU, "
             f"median of interleaved repeats, speed-up against the baseline in the same run; {_machines(rows)}. "
             "*ideal*: the multiply-adds ratio with block widths padded to that CPU's channel block.", "",
             "| method | ratio | options | widths | params | MACs (M) | bytes | x base | compressed | recon. | recal. | final | "
             "p50 b1 ms | p50 b256 ms | speed-up b256 | ideal | session RAM b1 (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = _stage_widths(r) if r["method"] in ("second", "l1") else ""
        ideal = f"{r['ideal_speedup']:.2f}" if r.get("ideal_speedup") else ""
        lines.append(
            f"| {_label(r)} | {r['ratio']:g} | {_options(r)} | {widths} | {r['params']:,} | {r['macs'] / 1e6:.2f} | "
            f"{r['model_bytes']:,} | {r['model_bytes'] / base['model_bytes']:.3f} | "
            f"{_pct(r.get('accuracy_clustered', r.get('accuracy_pruned')))} | {_pct(r.get('accuracy_reconstructed'))} | "
            f"{_pct(r.get('accuracy_recalibrated'))} | {_pct(r['accuracy'])} | "
            f"{r.get('p50_ms_b1', float('nan')):.3f} | {r.get('p50_ms_b256', float('nan')):.2f} | "
            f"{r.get('speedup_b256', float('nan')):.2f} | {ideal} | {_mb(r.get('session_rss_bytes_b1'))} |")
    lines += ["", "Accuracies in %; *compressed*: right after clustering (first, second) or pruning (l1); "
              "*final*: the exported ONNX file under ONNX Runtime, after fine-tuning. "
              "Method first saves bytes on disk, not RAM: ONNX Runtime materialises the full conv weights "
              "when it folds the Gather at load. Method second saves both.", ""]
    for name, title in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)
