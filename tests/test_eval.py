import csv
import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import run_cli
from eval.bench import BenchConfig, bench
from toolchain.cpu import machine
from eval.checks import check_model, parse_size
from eval.runtime import ModelFileError, load_onnx
from toolchain.errors import ToolchainError
from toolchain.models import build_model, count_macs
from toolchain.sweep import ideal_speedup

ROW_FIELDS = {"model", "provider", "batch_size", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "speedup"}


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory, baseline_path):
    """The real baseline and its method-first export (no fine-tuning), as ONNX files."""
    from toolchain.pipeline import ExportConfig, run_export
    folder = tmp_path_factory.mktemp("onnx")
    paths = []
    for method in ("none", "first"):
        out = folder / f"{method}.onnx"
        run_export(ExportConfig(method=method, checkpoint=str(baseline_path), out=str(out), finetune_epochs=0,
                                train_limit=1024, test_limit=500), log=print)
        paths.append(out)
    return paths


def test_bench_rows_and_baseline_speedup(onnx_pair):
    rows = bench(onnx_pair, BenchConfig(batch_sizes=(1, 8), warmup=1, repeats=3))
    assert len(rows) == 4
    for row in rows:
        assert set(row) >= ROW_FIELDS and row["p50_ms"] > 0 and row["p50_ms"] <= row["p99_ms"]
        assert row["session_rss_bytes"] > 1_000_000  # a real session holds megabytes
    assert [r["speedup"] for r in rows if r["model"] == str(onnx_pair[0])] == [1.0, 1.0]


def test_bench_times_a_model_only_after_it_has_run_untimed_since_the_switch(onnx_pair, monkeypatch):
    """Another model's ONNX Runtime threads spin for a few ms after its run: every timed run must
    follow untimed runs of the same model (settle), never a run of the other model directly."""
    from eval import bench as bench_module
    calls = []
    run, settle = bench_module._Runner.run, bench_module._Runner.settle
    monkeypatch.setattr(bench_module._Runner, "run", lambda self: calls.append(("timed", id(self))) or run(self))
    monkeypatch.setattr(bench_module._Runner, "settle",
                        lambda self, ms: calls.append(("settle", id(self))) or settle(self, ms))
    bench(onnx_pair, BenchConfig(batch_sizes=(1,), warmup=1, repeats=3, settle_ms=1.0))
    timed = [i for i, (kind, _) in enumerate(calls) if kind == "timed"]
    assert len(timed) == 2 * 1 + 2 * 3  # warm-up runs, then the repeats
    assert all(calls[i - 1] == ("settle", calls[i][1]) for i in timed[2:])
    assert len({runner for _, runner in calls}) == 2


def test_eval_onnx_on_real_images_matches_checkpoint(onnx_pair, baseline_path, data_root):
    onnx_row = json.loads(run_cli("eval", onnx_pair[0], "--data", data_root, "--limit", "500", "--json", "-").stdout)
    pt_row = json.loads(run_cli("eval", baseline_path, "--data", data_root, "--limit", "500", "--json", "-").stdout)
    assert onnx_row["accuracy"] == pytest.approx(pt_row["accuracy"], abs=0.004)  # 2 of 500 images
    assert onnx_row["params"] == pt_row["params"] and onnx_row["macs"] == pt_row["macs"]


def test_check_pass_and_fail(onnx_pair, tmp_path):
    size = onnx_pair[1].stat().st_size
    rows = check_model(onnx_pair[1], max_bytes=size, max_params=10**6, max_latency_ms=1000, repeats=3)
    assert all(r["ok"] for r in rows)
    ok = run_cli("check", onnx_pair[1], "--max-bytes", str(size), "--max-params", "1000000")
    assert ok.returncode == 0, ok.stderr
    too_big = run_cli("check", onnx_pair[0], "--max-bytes", "300KB")
    assert too_big.returncode == 1 and "bytes" in too_big.stderr
    assert parse_size("1.5MB") == 1_500_000 and parse_size("2KiB") == 2048 and parse_size("77") == 77


def test_corrupt_truncated_and_foreign_onnx(onnx_pair, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_pair[0].read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        load_onnx(truncated)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 64, 64])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(ModelFileError, match=r"expected \[batch, 3, 32, 32\]"):
        load_onnx(foreign)
    result = run_cli("check", truncated)
    assert result.returncode == 2 and "not a valid ONNX model" in result.stderr


def test_sweep_writes_a_consistent_report_and_resumes(tmp_path, baseline_path, data_root):
    args = ["sweep", "--method", "first", "--method", "second", "--method", "l1", "--ratios", "0.5", "--data", data_root,
            "--checkpoint", baseline_path, "--finetune-epochs", "1", "--train-limit", "128",
            "--test-limit", "100", "--repeats", "2", "--out", tmp_path / "report"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "report"
    for name in ("report.md", "results.json", "results.csv", "accuracy.png", "size.png", "latency.png",
                 "macs.png", "finetune.png", "peer_structural.png", "peer_size.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())
    rows = results["rows"]
    # The shared settings only: rows accumulate over runs with other methods and ratios.
    assert "methods" not in results["config"] and results["config"]["export"]["finetune_epochs"] == 1
    # method first twice from one fine-tuned model (float, int8 centroids), then both peers
    assert [(r["method"], r["centroid_bits"]) for r in rows] == [
        ("none", None), ("first", None), ("first", 8), ("int8-dynamic", None), ("l1", None), ("second", None)]
    first, first_int8, int8_peer, l1, second = rows[1:]
    assert first["finetune_curve"] == first_int8["finetune_curve"]  # the same model, quantized
    assert first_int8["model_bytes"] < 0.5 * first["model_bytes"]
    assert int8_peer["model_bytes"] < 0.35 * rows[0]["model_bytes"]
    assert l1["inner_widths"] == second["inner_widths"] and l1["macs"] == second["macs"]
    # Latency and the ideal speed-up belong to the CPU the rows were benchmarked on, recorded.
    assert all(r["bench_machine"] == machine() for r in rows)
    assert 1 < second["ideal_speedup"] <= rows[0]["macs"] / second["macs"] + 1e-9
    with open(report / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["accuracy"]) for r in table] == [r["accuracy"] for r in rows]
    assert all(r["test_images"] == 100 and len(r["finetune_curve"]) == (r["method"] not in ("none", "int8-dynamic"))
               for r in rows)
    text = (report / "report.md").read_text()
    assert all(f"{r['model_bytes']:,}" in text for r in rows)
    assert text.count("**Who wins:**") == 2
    assert f"channel block {machine()['channel_block']}" in text
    again = run_cli(*args)
    assert again.returncode == 0 and again.stdout.count("already done, skipped") == 4
    # Another method-second option redoes that method's row alone, in place.
    other = run_cli(*args, "--keep", "medoid")
    assert other.returncode == 0 and other.stdout.count("already done, skipped") == 3, other.stderr
    redone = json.loads((report / "results.json").read_text())["rows"]
    assert [r["method"] for r in redone] == [r["method"] for r in rows]
    assert redone[-1]["options"]["keep"] == "medoid" and rows[-1]["options"]["keep"] == "salient"
    assert [(r["options"], r["accuracy"]) for r in redone[:-1]] == [(r["options"], r["accuracy"]) for r in rows[:-1]]
    # Another allocation is another model: its row stands beside the uniform one, compared in the report.
    latency = run_cli("sweep", "--method", "second", "--allocation", "latency", *args[args.index("--ratios"):])
    assert latency.returncode == 0, latency.stderr
    both = json.loads((report / "results.json").read_text())["rows"]
    seconds = [r for r in both if r["method"] == "second"]
    assert [r["options"]["allocation"] for r in seconds] == ["uniform", "latency"]
    assert seconds[1]["macs"] <= seconds[0]["macs"] and Path(seconds[1]["file"]).name == "second_r0.5_latency.onnx"
    text = (report / "report.md").read_text()
    assert "the same multiply-adds on other widths" in text and "**Fastest at ratio 0.5**" in text
    assert all(r.get("accuracy_clustered") or r.get("accuracy_pruned") for r in both
               if r["method"] in ("first", "second", "l1"))  # the sweep measures every stage
    # 4-bit centroids: a fine-tune of their own, added beside the float and int8 rows.
    four = run_cli("sweep", "--method", "first", "--centroid-bits", "4", *args[args.index("--ratios"):])
    assert four.returncode == 0 and four.stdout.count("already done, skipped") == 2, four.stderr
    rows4 = json.loads((report / "results.json").read_text())["rows"]
    assert [r["centroid_bits"] for r in rows4 if r["method"] == "first"] == [None, 4, 8]
    int4 = next(r for r in rows4 if r["centroid_bits"] == 4)
    assert Path(int4["file"]).name == "first_r0.5_int4.onnx" and int4["model_bytes"] < first_int8["model_bytes"]
    assert "first int4 r0.5" in (report / "report.md").read_text()
    refused = run_cli("sweep", "--method", "second", "--centroid-bits", "4", *args[args.index("--ratios"):])
    assert refused.returncode == 2 and "sweep --method first too" in refused.stderr


def test_sweep_resume_reads_missing_teacher_settings_as_those_of_their_time(tmp_path):
    """A results.json from before the teacher settings were recorded was made without the feature term
    and at temperature 4: resuming it with today's defaults is refused, with those settings it goes on."""
    from toolchain.pipeline import ExportConfig
    from toolchain.sweep import SweepConfig, _config_record, _load_rows
    today = _config_record(SweepConfig(export=ExportConfig(method="none")))
    old = {"export": {k: v for k, v in today["export"].items() if not k.startswith("distill_")}}
    (tmp_path / "results.json").write_text(json.dumps({"config": old, "rows": [{"method": "baseline"}]}))
    with pytest.raises(ToolchainError, match=r"other settings \(distill_features\)"):
        _load_rows(tmp_path / "results.json", today)
    then = _config_record(SweepConfig(export=ExportConfig(method="none", distill_features=0.0, distill_temperature=4.0)))
    assert [r["method"] for r in _load_rows(tmp_path / "results.json", then)] == ["none"]  # upgraded: schema 1 said baseline


def test_ideal_speedup_pads_widths_to_the_channel_block():
    half = [8, 8, 8, 16, 16, 16, 32, 32, 32]  # ResNet20 at ratio 0.5
    macs = count_macs(build_model("resnet20"))
    row = {"arch": "resnet20", "inner_widths": half}
    assert ideal_speedup(row, macs, 1) == pytest.approx(macs / count_macs(build_model("resnet20", inner_widths=half)))
    padded = [16] * 6 + [32] * 3  # a width of 8 costs what 16 costs on an AVX-512 CPU
    assert ideal_speedup(row, macs, 16) == pytest.approx(macs / count_macs(build_model("resnet20", inner_widths=padded)))
    assert ideal_speedup({"inner_widths": None}, macs, 16) is None
