"""The method registry: a method added in one file and one registry entry runs through the
export and the sweep untouched; results files of the older schema are upgraded."""

from __future__ import annotations

import copy
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from toolchain import registry
from toolchain.methods import Implementation
from toolchain.results import SCHEMA, upgrade

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class MagnitudeConfig:
    ratio: float = 0.5
    seed: int = 0


def apply_magnitude(model, cfg: MagnitudeConfig):
    """Zero the smallest `ratio` of every conv's weights, on a copy."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight.data
            w[w.abs() <= w.abs().flatten().kthvalue(int(cfg.ratio * w.numel())).values] = 0
    return model, {"zeroed_share": cfg.ratio}


@pytest.fixture
def magnitude(monkeypatch):
    """A method that lives only in this test: one module with an IMPLEMENTATION, one registry entry."""
    module = types.ModuleType("magnitude_method")
    module.IMPLEMENTATION = Implementation(config=MagnitudeConfig, apply=apply_magnitude)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    method = registry.Method("magnitude", "zero the smallest conv weights", module=module.__name__)
    monkeypatch.setattr(registry, "METHODS", registry.METHODS + (method,))
    monkeypatch.setitem(registry._BY_NAME, method.name, method)
    return method


def _conv_weights(path) -> list[np.ndarray]:
    proto = onnx.load(str(path))
    return [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) == 4]


def test_a_registered_method_exports_without_touching_the_pipeline(magnitude, baseline, baseline_path, data_root,
                                                                   test_split, tmp_path):
    from eval.accuracy import evaluate_onnx
    from eval.runtime import create_session
    from toolchain.data import to_tensor
    from toolchain.pipeline import ExportConfig, run_export
    out = tmp_path / "magnitude.onnx"
    result = run_export(ExportConfig(method="magnitude", ratio=0.3, checkpoint=str(baseline_path), data=str(data_root),
                                     finetune_epochs=0, train_limit=512, test_limit=500, out=str(out)),
                        log=lambda _: None)
    assert result.manifest["method"] == "magnitude" and result.manifest["config"]["options"]["ratio"] == 0.3
    weights = _conv_weights(out)
    assert weights and all(abs((w == 0).mean() - 0.3) < 0.02 for w in weights)  # the method ran, at the ratio given
    # The file's stem holds exactly the zeros of the method applied here by hand (the export folds
    # the recalibrated BN into the conv, which scales each filter but keeps its zeros).
    pruned, _ = apply_magnitude(baseline.model, MagnitudeConfig(ratio=0.3))
    stem = [w for w in weights if w.shape == tuple(pruned.conv1.weight.shape)][0]
    np.testing.assert_array_equal(stem == 0, pruned.conv1.weight.detach().numpy() == 0)
    images = to_tensor(test_split.images[:16], baseline.mean, baseline.std)
    logits = create_session(out).run(None, {"input": images.numpy()})[0]
    assert logits.shape == (16, 10)
    assert evaluate_onnx(out, test_split.subset(500))["accuracy"] > 0.5  # real images, a working model


@pytest.mark.slow
def test_a_registered_method_is_swept_and_reported(magnitude, baseline_path, data_root, tmp_path):
    from toolchain.pipeline import ExportConfig
    from toolchain.sweep import SweepConfig, run_sweep
    shared = ExportConfig(method="none", checkpoint=str(baseline_path), data=str(data_root), finetune_epochs=0,
                          train_limit=256, test_limit=100)
    results = run_sweep(SweepConfig(methods=("magnitude",), ratios=(0.3,), out=str(tmp_path / "r"), export=shared,
                                    batch_sizes=(1,), repeats=2), log=lambda _: None)
    assert results["schema"] == SCHEMA
    assert [(r["method"], r["ratio"]) for r in results["rows"]] == [("none", 0.0), ("magnitude", 0.3)]
    assert "| magnitude | 0.3 |" in (tmp_path / "r" / "report.md").read_text()


def test_registry_lookup_refuses_unknown_names_with_the_choices():
    from toolchain.errors import ToolchainError
    with pytest.raises(ToolchainError, match="unknown method 'third'; choose one of first, second"):
        registry.get("third")


def test_cli_choices_come_from_the_registry():
    from toolchain.cli import export, sweep
    choices = {c.name: list(p.type.choices) for c in (export, sweep) for p in c.params if p.name in ("method", "methods")}
    assert choices == {"export": registry.names(registry.MODEL, registry.BASELINE), "sweep": registry.names(registry.MODEL)}


SCHEMA1 = {  # as sweeps wrote results.json before the schema was versioned
    "config": {"export": {"finetune_epochs": 5, "distill": True, "round_to": 1,
                          "method_options": {"features": "scaled", "allocation": "uniform", "keep": "salient"}},
               "batch_sizes": [1, 256], "repeats": 20},
    "rows": [{"method": "baseline", "ratio": 0.0, "accuracy": 0.88}, {"method": "first", "ratio": 0.5, "accuracy": 0.85},
             {"method": "second", "ratio": 0.5, "accuracy": 0.86, "options": {"keep": "medoid", "allocation": "uniform"}},
             {"method": "l1", "ratio": 0.5, "accuracy": 0.86}]}


def test_upgrade_reads_schema_1_as_today():
    before = copy.deepcopy(SCHEMA1)
    new = upgrade(SCHEMA1)
    assert SCHEMA1 == before  # the argument is left as it is
    assert new["schema"] == SCHEMA == 2
    assert [r["method"] for r in new["rows"]] == ["none", "first", "second", "l1"]
    # options: per row where recorded, else the ones the method takes from the shared record
    assert [r["options"] for r in new["rows"]] == [{}, {"features": "scaled", "allocation": "uniform"},
                                                   {"keep": "medoid", "allocation": "uniform"}, {}]
    export = new["config"]["export"]
    assert "method_options" not in export and (export["distill_features"], export["distill_temperature"]) == (0.0, 4.0)
    assert upgrade(new) == new
    with pytest.raises(ValueError, match="newer"):
        upgrade({**new, "schema": SCHEMA + 1})


@pytest.mark.parametrize("report", ["report", "report-fd1", "report-t8", "report-kernels"])
def test_committed_reports_are_what_their_results_give(report, tmp_path):
    """The committed report.md is exactly what today's report code writes from its results.json."""
    from eval.report import write_report
    folder = ROOT / "artifacts" / report
    results = json.loads((folder / "results.json").read_text())
    assert results["schema"] == SCHEMA
    write_report(tmp_path, upgrade(results))
    assert (tmp_path / "report.md").read_text() == (folder / "report.md").read_text()
    assert (tmp_path / "results.csv").read_text() == (folder / "results.csv").read_text()
