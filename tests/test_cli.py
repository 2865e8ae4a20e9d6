import json

import pytest

from conftest import run_cli

EVAL_FIELDS = {"model", "provider", "accuracy", "images", "model_bytes", "gzip_bytes", "params", "macs", "seconds"}


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    listed = result.stdout.split("Commands:")[1].split()
    for command in ("train", "export", "eval", "bench", "sweep", "check"):
        assert command in listed
        assert run_cli(command, "--help").returncode == 0


def test_eval_checkpoint_json_on_real_images(baseline_path, data_root):
    result = run_cli("eval", baseline_path, "--data", data_root, "--limit", "1000", "--json", "-")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert set(row) >= EVAL_FIELDS
    assert row["images"] == 1000 and row["accuracy"] > 0.85
    assert row["params"] == 269_722 and row["macs"] == 40_551_040


@pytest.mark.slow
def test_export_then_eval_onnx(tmp_path, baseline_path, data_root):
    out = tmp_path / "none.onnx"
    result = run_cli("export", "--method", "none", "--checkpoint", baseline_path, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "max abs difference" in result.stdout and out.is_file()
    assert json.loads(out.with_suffix(".manifest.json").read_text())["method"] == "none"
    result = run_cli("eval", out, "--data", data_root, "--limit", "500", "--json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] > 0.85
    # --provider cuda without CUDA, or fallen back to the CPU: test_bad_input.py and test_eval.py


def test_cli_defaults_are_the_library_defaults():
    """The CLI and the library read their defaults from toolchain.settings: what a command receives is the library default."""
    from dataclasses import MISSING, fields

    from toolchain.cli import export, sweep
    from toolchain.pipeline import ExportConfig

    library = {f.name: f.default for f in fields(ExportConfig) if f.default is not MISSING}
    # The sweep's --out is a folder of its own; its --quantize lists the kinds to add (the export's is one).
    for command, skip in ((export, set()), (sweep, {"out", "quantize"})):
        given = command.make_context(command.name, []).params  # what the command receives with no options
        shared = {name: value for name, value in given.items() if name in library and name not in skip}
        assert {"finetune_epochs", "finetune_lr", "distill_temperature"} <= set(shared)
        assert shared == {name: library[name] for name in shared}, command.name
    # The teacher settings default to None there: ExportConfig resolves them to the one written default.
    from toolchain import settings
    from toolchain.training import TrainConfig
    resolved = ExportConfig()
    assert (resolved.distill_features, resolved.distill_temperature) == (settings.DISTILL_FEATURES,
                                                                        settings.DISTILL_TEMPERATURE)
    assert TrainConfig.distill_temperature == settings.DISTILL_TEMPERATURE


def test_sweep_codebooks_take_sizes_as_export_does():
    import click

    from toolchain.cli import _codebook_list
    assert _codebook_list(" layer:256, stage:0.25 ,network:64x3") == [("layer", 256, 1), ("stage", 0.25, 1),
                                                                       ("network", 64, 3)]
    assert isinstance(_codebook_list("layer:256")[0][1], int)
    for bad in ("layer:quarter", "layer:256x0", "layer:256x9", "layer:256x", "layer:256xtwo"):
        with pytest.raises(click.BadParameter, match=f"'{bad}' is not SCOPE:SIZE"):
            _codebook_list(bad)
