"""Fuzzing the two loaders a user feeds files to: mutated and random bytes give the clear error or
a model, never any other exception."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolchain.checkpoints import load_checkpoint
from toolchain.errors import ToolchainError

FUZZ = settings(max_examples=40, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

mutations = st.tuples(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.floats(0, 1)),  # truncate to this fraction of the file
)


def mutate(data: bytes, mutation) -> bytes:
    flips, keep = mutation
    buf = bytearray(data)
    for where, value in flips:
        buf[int(where * len(buf))] = value
    return bytes(buf[:int(keep * len(buf))] if keep is not None else buf)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """A real exported model small enough to mutate many times (method first at ratio 0.9)."""
    from conftest import random_resnet20
    from export.onnx_export import export_onnx
    from toolchain.methods.first import FirstConfig, apply_first
    import torch
    model, _ = apply_first(random_resnet20(), FirstConfig(ratio=0.9, n_init=1))
    out = tmp_path_factory.mktemp("fuzz") / "small.onnx"
    export_onnx(model, out, {"method": "first", "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
                torch.randn(2, 3, 32, 32), keep_structure=True)
    return out.read_bytes()


@FUZZ
@given(mutation=mutations)
def test_mutated_onnx_is_a_model_or_the_clear_error(tmp_path, small_onnx, mutation):
    from eval.runtime import create_session, load_onnx
    path = tmp_path / "fuzzed.onnx"
    path.write_bytes(mutate(small_onnx, mutation))
    try:
        load_onnx(path)
        session = create_session(path)
        session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})
    except ToolchainError:
        pass


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_the_clear_error(tmp_path, data):
    from eval.runtime import load_onnx
    for suffix, load in ((".onnx", load_onnx), (".pt", load_checkpoint)):
        path = tmp_path / f"random{suffix}"
        path.write_bytes(data)
        with pytest.raises(ToolchainError):
            load(path)


@FUZZ
@given(mutation=mutations)
def test_mutated_checkpoint_is_a_model_or_the_clear_error(tmp_path, baseline_path, mutation):
    path = tmp_path / "fuzzed.pt"
    path.write_bytes(mutate(baseline_path.read_bytes(), mutation))
    try:
        load_checkpoint(path)
    except ToolchainError:
        pass
