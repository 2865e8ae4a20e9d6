"""Sweep results -> results.csv, report.md and PNG plots (accuracy, size, latency, MACs, fine-tuning, peers)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from toolchain import registry, settings
from toolchain.io import atomic_path
from toolchain.results import baseline_row, method_of, row_allocation, rows_of

COLUMNS = ["method", "ratio", "centroid_bits", "options", "inner_widths", "params", "macs", "model_bytes", "gzip_bytes",
           "accuracy_clustered", "accuracy_pruned", "accuracy_reconstructed", "accuracy_recalibrated", "accuracy_finetuned",
           "accuracy_quantized",
           "accuracy", "finetune_epochs", "p50_ms_b1", "p50_ms_b256", "speedup_b1", "speedup_b256",
           "ideal_speedup", "session_rss_bytes_b1", "test_images", "file"]
STAGES = [("accuracy_clustered", "clustered", ":"), ("accuracy_pruned", "pruned", ":"), ("accuracy_reconstructed", "reconstructed", "-."),
          ("accuracy_recalibrated", "BN recalibrated", "--"), ("accuracy", "final (ONNX Runtime)", "-")]


def write_report(out: str | Path, results: dict) -> None:
    """results: a results file of today's schema (toolchain.results.upgrade makes one of an older)."""
    out = Path(out)
    rows = results["rows"]
    _write_text(out / "results.csv", _csv(rows))
    plots = _plots(out, rows)
    peer_plots = dict(_peer_plots(out, rows))  # shown in the peer sections, beside their tables
    sections = [_markdown(results, plots), _allocation_markdown(rows), _peer_markdown(rows, peer_plots),
                _quantized_markdown(rows)]
    _write_text(out / "report.md", "\n".join(s for s in sections if s))


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
    """The series a row belongs to: method, the size its config names (kernel codebooks), a non-uniform
    allocation, int8 centroids."""
    allocation = row_allocation(row)
    return (method_of(row).display + (f" {row['label']}" if row.get("label") else "")
            + ("" if allocation == settings.UNIFORM else f" {allocation}")
            + (f" int{row['centroid_bits']}" if row.get("centroid_bits") else "")
            + (f" q{row['quantize']}" if row.get("quantize") else ""))


def _name(row: dict) -> str:
    """A row in a table: its series and, where it has one, its ratio."""
    return _label(row) + ("" if row.get("label") else f" r{row['ratio']:g}")


def _has_ratio(row: dict) -> bool:
    return not row.get("label")  # a config that names its own size (kernel codebooks) has no ratio


def _ratio(row: dict) -> str:
    return f"{row['ratio']:g}" if _has_ratio(row) else ""


def _series(rows, label):
    return sorted((r for r in rows if _label(r) == label), key=lambda r: r["ratio"])


def _plots(out: Path, rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline_row(rows)
    methods = sorted({_label(r) for r in rows if method_of(r).kind == registry.MODEL and _has_ratio(r)})
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
            ax.plot(xs, [100 * y for y in ys], "-o", label=_name(r))
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


def compared(rows: list[dict], compare: str) -> list[tuple[registry.Method, list[registry.Method]]]:
    """(method, its peers with rows here) for every registered method compared with its peers this way
    ("epochs" or "size") that has rows here and at least one peer with rows."""
    found = [(m, [p for p in map(registry.get, m.peers) if rows_of(rows, p)])
             for m in registry.METHODS if m.compare == compare and rows_of(rows, m)]
    return [(m, peers) for m, peers in found if peers]


def epoch_pairs(rows: list[dict], method: registry.Method, peer: registry.Method) -> list[tuple[float, dict, dict]]:
    """(ratio, the method's row, the peer's row) wherever both were swept (the method at uniform
    widths and full storage, which the peer's widths copy)."""
    peers = {r["ratio"]: r for r in rows_of(rows, peer)}
    return [(r["ratio"], r, peers[r["ratio"]]) for r in rows_of(rows, method)
            if _label(r) == method.display and r["ratio"] in peers]


def allocation_groups(rows: list[dict]) -> list[tuple[registry.Method, float, list[dict]]]:
    """(method, ratio, its rows of every allocation) where a method that changes widths was swept
    with more than one allocation at a ratio: the same multiply-add budget spent on other widths."""
    groups = {}
    for r in rows:
        if r.get("inner_widths"):
            groups.setdefault((r["method"], r["ratio"]), []).append(r)
    return [(method_of(group[0]), ratio, sorted(group, key=lambda r: row_allocation(r) != settings.UNIFORM))  # uniform first
            for (_, ratio), group in sorted(groups.items()) if len(group) > 1]


def size_rows(rows: list[dict], method: registry.Method, peers: list[registry.Method]) -> tuple[list[dict], list[dict]]:
    """The size peers' rows and the method's rows (every storage width and size)."""
    return [r for p in peers for r in rows_of(rows, p)], rows_of(rows, method)


def _peer_plots(out: Path, rows: list[dict]) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    base = baseline_row(rows)
    figures = []
    save = _saver(out, figures)
    for method, (peer, *_) in compared(rows, "epochs"):  # one structural peer: its widths are the method's
        pairs = epoch_pairs(rows, method, peer)
        if not pairs:
            continue
        fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.2), squeeze=False)
        for ax, (ratio, ours, theirs) in zip(axes[0], pairs):
            for row, label in ((ours, f"method {method.name}"), (theirs, peer.title)):
                pts = [(e, 100 * a) for e in range(len(row["finetune_curve"]) + 1)
                       if (a := accuracy_after(row, e)) is not None]
                ax.plot(*zip(*pts), "-o", label=label)
            baseline_line(ax, 100 * base["accuracy"])
            ax.set(xlabel="fine-tuning epochs (0: before fine-tuning)", ylabel="test accuracy (%)",
                   title=f"ratio {ratio:g}, widths {_stage_widths(ours)}")
            ax.legend(fontsize=7)
        save(fig, method.peer_plot_file, f"Method {method.name} against {peer.title}")
    for method, peers in compared(rows, "size"):
        theirs, ours = size_rows(rows, method, peers)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        filters = [r for r in ours if _has_ratio(r)]
        for bits in sorted({r.get("centroid_bits") or 32 for r in filters}, reverse=True):
            bits, label = (None, f"method {method.name}, float {method.storage}") if bits == 32 else \
                (bits, f"method {method.name}, {bits}-bit {method.storage}")
            series = sorted((r for r in filters if r.get("centroid_bits") == bits), key=lambda r: r["model_bytes"])
            if series:
                ax.plot([r["model_bytes"] / 1e3 for r in series], [100 * r["accuracy"] for r in series], "-o", label=label)
                for r in series:
                    ax.annotate(f"r{r['ratio']:g}", (r["model_bytes"] / 1e3, 100 * r["accuracy"]), fontsize=7,
                                textcoords="offset points", xytext=(4, -10))
        for r in (r for r in ours if not _has_ratio(r)):  # a config of its own size (kernel codebooks): a point each
            ax.plot([r["model_bytes"] / 1e3], [100 * r["accuracy"]], "D", label=_name(r))
        for marker, r in zip("s^vP", theirs):
            ax.plot([r["model_bytes"] / 1e3], [100 * r["accuracy"]], marker, color="red", label=f"peer: {_peer_name(r)}")
        ax.plot([base["model_bytes"] / 1e3], [100 * base["accuracy"]], "*", color="black", ms=12, label="baseline")
        ax.set(xscale="log", xlabel="ONNX file size (kB, log scale)", ylabel="test accuracy (%)",
               title="Accuracy against file size")
        ax.legend(fontsize=7)
        save(fig, method.peer_plot_file, f"Method {method.name} against {', '.join(p.title for p in peers)}")
    return figures


def _peer_name(row: dict) -> str:
    """A size peer's row: its title, and what it was made from (the baseline's file, or its label)."""
    m = method_of(row)
    return m.title + (" of the baseline" if m.kind == registry.FILE else f" {row.get('label') or ''}".rstrip())


def _epochs_markdown(rows: list[dict], method: registry.Method, peer: registry.Method, plot: str) -> list[str]:
    pairs = epoch_pairs(rows, method, peer)
    if not pairs:
        return []
    ours, theirs = method.name, f"{peer.short_name} peer"
    lines = [f"## Method {ours} against {peer.title}", "",
             f"{peer.report_note} Budgets 1, 3, 5 are the test accuracies after those epochs of one run of the "
             "stated schedule; 0 is before fine-tuning.", "",
             f"| ratio | epochs | {ours} | {theirs} | {ours} - {peer.short_name} (points) |", "|---|---|---|---|---|"]
    behind = []
    for ratio, a_row, b_row in pairs:
        for epochs in sorted({0, 1, 3, 5, len(a_row["finetune_curve"])}):
            a, b = accuracy_after(a_row, epochs), accuracy_after(b_row, epochs)
            if a is None or b is None:
                continue
            lines.append(f"| {ratio:g} | {epochs} | {_pct(a)} | {_pct(b)} | {100 * (a - b):+.2f} |")
            if a < b:
                behind.append(f"ratio {ratio:g} after {epochs} epoch{'' if epochs == 1 else 's'}")
        lines.append(f"| {ratio:g} | ONNX Runtime | {_pct(a_row['accuracy'])} | {_pct(b_row['accuracy'])} | "
                     f"{100 * (a_row['accuracy'] - b_row['accuracy']):+.2f} |")
    verdict = (f"method {ours} is at least as accurate as the {theirs} at every budget measured." if not behind else
               f"the {theirs} is ahead at " + ", ".join(behind) + f"; method {ours} everywhere else.")
    return lines + ["", f"**Who wins:** {verdict}", "", f"![{plot}]({method.peer_plot_file})", ""]


def _size_markdown(rows: list[dict], method: registry.Method, peers: list[registry.Method], plot: str) -> list[str]:
    base = baseline_row(rows)
    theirs, ours = size_rows(rows, method, peers)
    lines = [f"## Method {method.name} against {', '.join(p.title for p in peers)}", "",
             *[p.report_note for p in peers], "",
             "| model | bytes | x base | accuracy | p50 b1 ms | speed-up b256 |", "|---|---|---|---|---|---|"]
    for r in theirs + sorted(ours, key=lambda r: r["model_bytes"], reverse=True):
        name = f"peer: {_peer_name(r)}" if r in theirs else _name(r)
        lines.append(f"| {name} | {r['model_bytes']:,} | {r['model_bytes'] / base['model_bytes']:.3f} | "
                     f"{_pct(r['accuracy'])} | {r.get('p50_ms_b1', float('nan')):.3f} | "
                     f"{r.get('speedup_b256', float('nan')):.2f} |")
    verdicts = [_size_verdict(method, peer_row, ours) for peer_row in theirs]
    speed = (f"Method {method.name}'s files run at {min(r.get('speedup_b256', float('nan')) for r in ours):.2f}-"
             f"{max(r.get('speedup_b256', float('nan')) for r in ours):.2f}x the float baseline at batch 256; "
             + "; ".join(f"{_peer_name(r)} at {r.get('speedup_b256', float('nan')):.2f}x" for r in theirs) + ".")
    return lines + ["", "**Who wins where:** " + " ".join(verdicts) + " " + speed, "",
                    f"![{plot}]({method.peer_plot_file})", ""]


def _size_verdict(method: registry.Method, peer_row: dict, ours: list[dict]) -> str:
    """One sentence: where the method beats one peer's file (no more bytes, higher accuracy), or not."""
    peer = f"{_peer_name(peer_row)} ({peer_row['model_bytes']:,} bytes, {_pct(peer_row['accuracy'])}%)"
    fits = [r for r in ours if r["model_bytes"] <= peer_row["model_bytes"]]
    wins = [r for r in fits if r["accuracy"] > peer_row["accuracy"]]
    if wins:
        smallest = min(wins, key=lambda r: r["model_bytes"])
        return (f"Against {peer}: method {method.name} wins at {', '.join(_name(r) for r in wins)}, higher accuracy "
                f"in no more bytes (the smallest: {_name(smallest)}, {smallest['model_bytes']:,} bytes, "
                f"{_pct(smallest['accuracy'])}%).")
    if fits:
        best = max(fits, key=lambda r: r["accuracy"])
        return (f"Against {peer}: the peer wins at its size; every method-{method.name} file as small is less "
                f"accurate (best: {_name(best)}, {_pct(best['accuracy'])}% in {best['model_bytes']:,} bytes).")
    return f"Against {peer}: the peer wins; no method-{method.name} file here is as small."


def _peer_markdown(rows: list[dict], plots: dict[str, str]) -> str:
    lines = []
    for method, (peer, *_) in compared(rows, "epochs"):
        if method.peer_plot_file in plots:
            lines += _epochs_markdown(rows, method, peer, plots[method.peer_plot_file])
    for method, peers in compared(rows, "size"):
        if method.peer_plot_file in plots:
            lines += _size_markdown(rows, method, peers, plots[method.peer_plot_file])
    return "\n".join(lines)


def _allocation_markdown(rows: list[dict]) -> str:
    groups = allocation_groups(rows)
    if not groups:
        return ""
    base = baseline_row(rows)
    lines, verdicts = [], []
    for method in dict.fromkeys(m for m, _, _ in groups):
        lines += [f"## Method {method.name}: the same multiply-adds on other widths", "",
                  "`--allocation latency` keeps uniform widths' multiply-add budget but picks per-stage widths that "
                  "cost the CPU least once padded to its channel block (a width below the block costs the whole "
                  "block).", "", "| ratio | allocation | widths | MACs (x base) | final | speed-up b1 | speed-up b256 "
                  "| ideal | b256 / ideal |", "|---|---|---|---|---|---|---|---|---|"]
        for _, ratio, group in (g for g in groups if g[0] is method):
            for r in group:
                speedup, ideal = r.get("speedup_b256"), r.get("ideal_speedup")
                lines.append(f"| {ratio:g} | {row_allocation(r)} | {_stage_widths(r)} | "
                             f"{r['macs'] / base['macs']:.3f} | {_pct(r['accuracy'])} | "
                             f"{r.get('speedup_b1', float('nan')):.2f} | {speedup or float('nan'):.2f} | "
                             f"{ideal or float('nan'):.2f} | {speedup / ideal if speedup and ideal else float('nan'):.2f} |")
            fastest = max(group, key=lambda r: r.get("speedup_b256") or 0)
            verdicts += ["", f"**Fastest at ratio {ratio:g}** ({fastest['macs'] / base['macs']:.3f}x the baseline's "
                         f"multiply-adds): {row_allocation(fastest)}, {fastest.get('speedup_b256', float('nan')):.2f}x "
                         f"at batch 256 against an ideal {fastest.get('ideal_speedup') or float('nan'):.2f}x, at "
                         f"{_pct(fastest['accuracy'])}% accuracy."]
    return "\n".join(lines + verdicts + [""])


def _float_version(rows: list[dict], row: dict) -> dict | None:
    """The float model a quantized row was made from: same method, ratio and options."""
    return next((r for r in rows if not r.get("quantize") and not r.get("centroid_bits") and r["method"] == row["method"]
                 and r["ratio"] == row["ratio"] and r.get("label") == row.get("label")
                 and r.get("options") == row.get("options")), None)


def _quantized_markdown(rows: list[dict]) -> str:
    quantized = [r for r in rows if r.get("quantize")]
    if not quantized:
        return ""
    base = baseline_row(rows)
    peers = [r for r in rows if method_of(r).kind == registry.FILE]
    lines = ["## Static int8 (ONNX Runtime QDQ) against float", "",
             "Each model again as ONNX Runtime's static int8: weights int8 per output channel, activations uint8 "
             "per tensor, calibrated on training images; fine-tuned with the int8 rounding simulated (the same "
             "budget as its float version). Speed-ups against the float baseline in the same run.", "",
             "| model | float bytes | int8 bytes | float top-1 | int8 top-1 | int8 - float (points) | "
             "int8 speed-up b1 | int8 speed-up b256 |", "|---|---|---|---|---|---|---|---|"]
    for r in quantized:
        f = _float_version(rows, r) or {}
        gap = f"{100 * (r['accuracy'] - f['accuracy']):+.2f}" if f else ""
        lines.append(f"| {_name(r)} | {f.get('model_bytes', 0):,} | {r['model_bytes']:,} | "
                     f"{_pct(f.get('accuracy'))} | {_pct(r['accuracy'])} | {gap} | "
                     f"{r.get('speedup_b1', float('nan')):.2f} | {r.get('speedup_b256', float('nan')):.2f} |")
    for p in peers:
        lines.append(f"| peer: {method_of(p).title} | {base['model_bytes']:,} | {p['model_bytes']:,} | "
                     f"{_pct(base['accuracy'])} | {_pct(p['accuracy'])} | {100 * (p['accuracy'] - base['accuracy']):+.2f} | "
                     f"{p.get('speedup_b1', float('nan')):.2f} | {p.get('speedup_b256', float('nan')):.2f} |")
    for p in peers:
        beaten = [r for r in quantized if r["model_bytes"] < p["model_bytes"]
                  and (r.get("speedup_b256") or 0) > (p.get("speedup_b256") or 0)]
        others = [_name(r) for r in quantized if r not in beaten]
        lines += ["", f"**Against {method_of(p).title}:** " + (
            "every int8 file is smaller and faster." if not others else
            f"{len(beaten)} of {len(quantized)} int8 files are smaller and faster; not: {', '.join(others)}.")]
    return "\n".join(lines + [""])


def _mb(v):
    return "" if v is None else f"{v / 1e6:.1f}"


def _pct(v):
    return "" if v is None else f"{100 * v:.2f}"


def _machines(rows: list[dict]) -> str:
    """Where the latencies were measured: one CPU when all rows were benchmarked in one run."""
    seen = sorted({json.dumps(r["bench_machine"], sort_keys=True) for r in rows if r.get("bench_machine")})
    if not seen:
        return "machine not recorded"
    return "; ".join(f"measured on {m['cpu']}, {m['cores']} cores{_isa(m)}, ONNX Runtime {m['onnxruntime']}, "
                     f"channel block {m['channel_block']}" for m in map(json.loads, seen))


def _isa(machine: dict) -> str:
    """The instruction sets recorded with the benchmark (files before they were recorded: none)."""
    isa = machine.get("instruction_sets") or {}
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI"}
    return f" ({', '.join(names[k] for k, on in isa.items() if on) or 'no AVX2'})" if isa else ""


def _distillation(export: dict) -> str:
    if not export["distill"]:
        return ""
    features = export.get("distill_features") or 0  # reports made before the term existed have none
    blocks = f", residual block outputs at weight {features:g}" if features else ""
    return f" with distillation from the original (logits at temperature {export['distill_temperature']:g}{blocks})"


def _swept(rows: list[dict]) -> list[registry.Method]:
    """The compression methods with rows here, in registry order."""
    return [m for m in registry.METHODS if m.kind == registry.MODEL and rows_of(rows, m)]


def _stages(rows: list[dict]) -> str:
    """Which stage *compressed* is for each method swept, e.g. clustered: first, second; pruned: l1."""
    by_stage = {}
    for m in _swept(rows):
        by_stage.setdefault(m.implementation().stage, []).append(m.name)
    return "; ".join(f"{stage}: {', '.join(names)}" for stage, names in by_stage.items())


def _markdown(results: dict, plots: list[tuple[str, str]]) -> str:
    rows = results["rows"]
    base = baseline_row(rows)
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
        widths = _stage_widths(r)
        ideal = f"{r['ideal_speedup']:.2f}" if r.get("ideal_speedup") else ""
        lines.append(
            f"| {_label(r)} | {_ratio(r)} | {_options(r)} | {widths} | {r['params']:,} | {r['macs'] / 1e6:.2f} | "
            f"{r['model_bytes']:,} | {r['model_bytes'] / base['model_bytes']:.3f} | "
            f"{_pct(r.get('accuracy_clustered', r.get('accuracy_pruned')))} | {_pct(r.get('accuracy_reconstructed'))} | "
            f"{_pct(r.get('accuracy_recalibrated'))} | {_pct(r['accuracy'])} | "
            f"{r.get('p50_ms_b1', float('nan')):.3f} | {r.get('p50_ms_b256', float('nan')):.2f} | "
            f"{r.get('speedup_b256', float('nan')):.2f} | {ideal} | {_mb(r.get('session_rss_bytes_b1'))} |")
    notes = [f"Accuracies in %; *compressed*: right after the method ({_stages(rows)}); *final*: the exported ONNX "
             "file under ONNX Runtime, after fine-tuning."]
    shared = [m.name for m in _swept(rows) if m.implementation().shared_weights]
    if shared:
        many = len(shared) > 1
        notes.append(f"Method{'s' if many else ''} {' and '.join(shared)} save{'' if many else 's'} bytes on disk, not RAM: ONNX "
                     "Runtime materialises the full conv weights when it folds the Gather at load.")
    lines += ["", " ".join(notes), ""]
    for name, title in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)
