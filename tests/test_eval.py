import csv
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
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
from toolchain.models import build_model, count_macs, count_params
from toolchain.sweep import ideal_speedup

ROW_FIELDS = {"model", "provider", "batch_size", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "speedup"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, baseline_path):
    """The real baseline and its method-first and method-second exports at ratio 0.5 (refit on real
    images when the data is there, no fine-tuning), as ONNX files by method."""
    from toolchain.pipeline import ExportConfig, run_export
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for method, options in (("none", {}), ("first", {}), ("second", {"round_to": 1})):
        out = folder / f"{method}.onnx"
        run_export(ExportConfig(method=method, checkpoint=str(baseline_path), out=str(out), finetune_epochs=0,
                                train_limit=1024, test_limit=500, **options), log=print)
        paths[method] = out
    return paths


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory, baseline_path):
    """The real baseline and its method-first file at ratio 0.5 without data (clustered, no refit):
    what bench, check and eval are tried on; quick to make."""
    from toolchain.pipeline import ExportConfig, run_export
    folder = tmp_path_factory.mktemp("pair")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CIFAR10_ROOT", raising=False)
        for method in ("none", "first"):
            run_export(ExportConfig(method=method, checkpoint=str(baseline_path), out=str(folder / f"{method}.onnx"),
                                    finetune_epochs=0), log=print)
    return [folder / "none.onnx", folder / "first.onnx"]


def test_bench_rows_hold_the_percentiles_and_the_ratio_of_medians(onnx_pair, monkeypatch):
    """With every timed run's milliseconds known, each row holds their percentiles and the speed-up
    is the baseline's median over the model's."""
    from eval import bench as bench_module
    known = {str(onnx_pair[0]): [4.0, 1.0, 2.0, 3.0, 100.0], str(onnx_pair[1]): [1.0, 0.5, 2.5, 0.75, 1.5]}
    init = bench_module._Runner.__init__

    def timed_from_known(self, path, cfg, batch_size):
        init(self, path, cfg, batch_size)
        self.run = iter(known[str(path)]).__next__

    monkeypatch.setattr(bench_module._Runner, "__init__", timed_from_known)
    rows = bench(onnx_pair, BenchConfig(batch_sizes=(4,), warmup=0, repeats=5, settle_ms=0.1))
    for row, times in zip(rows, known.values()):
        assert set(row) >= ROW_FIELDS and row["batch_size"] == 4
        assert [row[f"p{q}_ms"] for q in (50, 90, 99)] == pytest.approx([np.percentile(times, q) for q in (50, 90, 99)],
                                                                        abs=1e-4)
        assert row["images_per_s"] == pytest.approx(4 / np.median(times) * 1000, abs=0.1)
        assert row["session_rss_bytes"] > 1_000_000  # a real session holds megabytes
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 3.0 / 1.0], abs=1e-4)


def test_bench_times_the_model_run(onnx_pair):
    """Real timings: 64 images take longer than one."""
    rows = bench(onnx_pair[:1], BenchConfig(batch_sizes=(1, 64), warmup=2, repeats=5))
    assert rows[1]["p50_ms"] > 2 * rows[0]["p50_ms"]


def test_bench_command_json(onnx_pair):
    result = run_cli("bench", *onnx_pair, "--batch-sizes", "1,8", "--warmup", "1", "--repeats", "3", "--json", "-")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["model"], r["batch_size"]) for r in rows] == [(str(m), b) for b in (1, 8) for m in onnx_pair]
    for base, row in zip(rows[::2], rows[1::2]):
        assert set(row) >= ROW_FIELDS and row["provider"] == "cpu"
        assert row["speedup"] == pytest.approx(base["p50_ms"] / row["p50_ms"], rel=1e-3)


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


@pytest.mark.parametrize("option, value, figure", [("--max-params", "1000", "params"),
                                                  ("--max-latency-ms", "0.001", "latency_ms")])
def test_check_fails_on_params_and_on_latency(onnx_pair, baseline, option, value, figure):
    result = run_cli("check", onnx_pair[0], option, value, "--json", "-")
    assert result.returncode == 1
    rows = {r["check"]: r for r in json.loads(result.stdout)}
    assert not rows[figure]["ok"] and rows["valid"]["ok"]
    if figure == "params":
        assert rows["params"]["value"] == count_params(baseline.model)  # PyTorch's count of the same model
    limit = rows[figure]["limit"]
    assert limit == float(value)
    assert result.stderr.strip().splitlines() == [f"error: {figure} {rows[figure]['value']} exceeds {limit}"]


def test_check_refuses_a_bad_size(onnx_pair):
    result = run_cli("check", onnx_pair[0], "--max-bytes", "12 parsecs")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: Invalid value for '--max-bytes': '12 parsecs' is not a size; "
                                                  "use e.g. 300KB, 1.5MB or a number of bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["first", "second"])
def test_manifest_tells_the_truth_about_the_file(exports, baseline_path, baseline, tmp_path, data_root, method):
    """Bytes, gzip bytes and the source's hash against the files; parameters and multiply-adds against
    the PyTorch model the method makes and against the graph (eval of the file without its manifest)."""
    from toolchain.methods.first import FirstConfig, apply_first
    from toolchain.methods.second import SecondConfig, apply_second
    path = exports[method]
    manifest = json.loads(path.with_suffix(".manifest.json").read_text())
    data = path.read_bytes()
    assert manifest["model_bytes"] == len(data) and manifest["gzip_bytes"] == len(gzip.compress(data, 9, mtime=0))
    assert manifest["source_checkpoint"]["sha256"] == hashlib.sha256(baseline_path.read_bytes()).hexdigest()
    model = (apply_first(baseline.model, FirstConfig(ratio=0.5, n_init=1)) if method == "first" else
             apply_second(baseline.model, SecondConfig(ratio=0.5, round_to=1, n_init=1)))[0]
    assert (manifest["params"], manifest["macs"]) == (count_params(model), count_macs(model))
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    result = run_cli("eval", tmp_path / "foreign.onnx", "--data", data_root, "--limit", "100", "--json", "-")
    row = json.loads(result.stdout)
    # BatchNorm stays a node in method first's file; method second's is folded into its conv, whose
    # bias then holds one number per channel instead of BatchNorm's two.
    folded = 0 if method == "first" else sum(m.num_features for m in model.modules()
                                             if isinstance(m, torch.nn.BatchNorm2d))
    assert (row["params"], row["macs"]) == (count_params(model) - folded, count_macs(model))


@pytest.mark.parametrize("available, message", [
    (["CPUExecutionProvider"], "execution provider cuda is not available (have: CPUExecutionProvider)"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"],
     "ONNX Runtime fell back to CPUExecutionProvider instead of CUDAExecutionProvider"),
])
def test_cuda_missing_or_fallen_back_is_refused(onnx_pair, data_root, tmp_path, monkeypatch, capsys, available,
                                                message):
    """A session on the CPU when CUDA was asked for is refused, also where CUDA is listed as available:
    here the session is made without it, as ONNX Runtime does when CUDA fails to start."""
    import signal

    import onnxruntime
    from eval import runtime
    from toolchain.cli import main
    session = onnxruntime.InferenceSession
    monkeypatch.setattr(runtime, "available_providers", lambda: available)
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda path, options=None, providers=None: session(path, options,
                                                                           providers=["CPUExecutionProvider"]))
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # main() would install its SIGTERM handler in pytest
    with pytest.raises(SystemExit) as exit:
        main(["eval", str(onnx_pair[0]), "--data", str(data_root), "--limit", "10", "--provider", "cuda",
              "--json", str(tmp_path / "eval.json")])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not any(tmp_path.iterdir())


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


@pytest.mark.slow
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
    assert text.count("**Who wins:**") == 1 and text.count("**Who wins where:**") == 1  # structural, size
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
    # Kernel codebooks and the weight-clustering peer: each one model of its own size, on the size plot.
    sized = run_cli("sweep", "--method", "first", "--method", "weight-clustering", "--codebooks", "layer:64,stage:32x3",
                    *args[args.index("--ratios"):])
    assert sized.returncode == 0 and sized.stdout.count("already done, skipped") == 2, sized.stderr
    rows5 = json.loads((report / "results.json").read_text())["rows"]
    new = [(r["method"], r["label"], r["centroid_bits"], r["ratio"], Path(r["file"]).name) for r in rows5 if r.get("label")]
    assert new == [("first", "kernel-layer64", None, 0.0, "first_kernel-layer64.onnx"),
                   ("first", "kernel-layer64", 8, 0.0, "first_kernel-layer64_int8.onnx"),
                   ("first", "kernel-stage32-residual2", None, 0.0, "first_kernel-stage32-residual2.onnx"),
                   ("first", "kernel-stage32-residual2", 8, 0.0, "first_kernel-stage32-residual2_int8.onnx"),
                   ("weight-clustering", "c16", None, 0.0, "weight-clustering_c16.onnx")]
    by_label = {(r["label"], r["centroid_bits"]): r for r in rows5 if r.get("label")}
    # (three uint8 indices a kernel against one and a codebook of 64 a conv)
    assert by_label["kernel-layer64", 8]["model_bytes"] < by_label["kernel-stage32-residual2", 8]["model_bytes"] \
        < by_label["c16", None]["model_bytes"] < 0.16 * rows[0]["model_bytes"]
    assert by_label["kernel-stage32-residual2", 8]["options"]["residual_codebooks"] == 2
    text = (report / "report.md").read_text()
    size_section = text[text.index("## Method first against int8 weight quantization, weight clustering"):]
    assert "| peer: weight clustering c16 |" in size_section and "| first kernel-stage32-residual2 int8 |" in size_section
    assert "Against weight clustering c16 (" in size_section and "Against int8 weight quantization of the baseline (" in size_section
    bad = run_cli("sweep", "--codebooks", "layer", *args[args.index("--ratios"):])
    assert bad.returncode == 2 and "'layer' is not SCOPE:SIZE" in bad.stderr


@pytest.mark.slow
def test_sweep_killed_mid_row_resumes_and_loses_nothing(tmp_path, baseline_path, data_root, train_split):
    import signal
    import subprocess
    import sys
    from conftest import REPO
    report = tmp_path / "report"
    args = ["sweep", "--method", "first", "--method", "second", "--ratios", "0.5", "--data", str(data_root),
            "--checkpoint", str(baseline_path), "--finetune-epochs", "1", "--train-limit", "128", "--test-limit", "100",
            "--repeats", "2", "--out", str(report)]
    proc = subprocess.Popen([sys.executable, "-m", "toolchain", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("== second_r0.5"):  # method first's rows are written, method second's is being made
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "run the same command again" in err, err
    before = json.loads((report / "results.json").read_text())["rows"]
    assert [(r["method"], r["centroid_bits"]) for r in before] == [("none", None), ("first", None), ("first", 8)]
    models = sorted(p.name for p in (report / "models").iterdir())
    assert [name for name in models if name.endswith(".onnx")] == sorted(Path(r["file"]).name for r in before)
    assert not [name for name in models if name.startswith(".")]  # no temporary file of the killed row
    again = run_cli(*args)
    assert again.returncode == 0 and again.stdout.count("already done, skipped") == 2, again.stderr
    after = {(r["method"], r["centroid_bits"]): r for r in json.loads((report / "results.json").read_text())["rows"]}
    assert set(after) == {("none", None), ("first", None), ("first", 8), ("int8-dynamic", None), ("second", None)}
    for row in before:  # kept as they were (the benchmark adds its figures)
        assert {k: after[row["method"], row["centroid_bits"]][k] for k in row} == row


def test_sweep_rows_of_kernel_codebooks_record_whether_kernels_were_reassigned():
    """A sweep resumes by each row's options: a kernel-codebook row made before kernels were reassigned
    (no `reassign` among its options) is redone, not taken for today's default; filter-level rows,
    which have no such option, keep the keys they had."""
    from toolchain.methods.first import FirstConfig
    from toolchain.pipeline import ExportConfig
    from toolchain.sweep import _identity, _key

    def identity(**options):
        return _identity(ExportConfig(method="first", options=FirstConfig(**options)))

    reassigned = identity(granularity="kernel")
    assert reassigned["options"] == {"features": "scaled", "allocation": "uniform", "reassign": True, "residual": False}
    earlier = {**reassigned, "options": {"features": "scaled", "allocation": "uniform"}}
    assert _key(earlier) != _key(reassigned)
    assert _key(identity(granularity="kernel", reassign=False)) not in (_key(reassigned), _key(earlier))
    assert identity()["options"] == {"features": "scaled", "allocation": "uniform"}


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
