"""Latency of ONNX models under ONNX Runtime, measured interleaved (A B A B ...) in one run.

Interleaving makes machine noise (other processes, frequency changes) hit every model alike,
so the speed-up against the first model (the baseline) is fair even on a busy machine. With
several models, each timed run follows a few milliseconds of untimed runs of the same model: after
a run, ONNX Runtime's worker threads spin for a while before they sleep, so the model that ran
before would otherwise hold the cores the timed one needs (docs/experiments/ has the figures).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from toolchain import settings
from toolchain.cpu import cpu_model, instruction_sets

from .memory import session_memory
from .runtime import PROVIDERS, create_session, load_onnx


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = settings.BENCH_BATCH_SIZES
    provider: str = "cpu"
    threads: int | None = None
    warmup: int = settings.BENCH_WARMUP
    repeats: int = settings.BENCH_REPEATS
    settle_ms: float = 10.0  # untimed runs of a model before each timed one (the previous model's threads spin)


class _Runner:
    """One model's session and a ready input; `run()` times one inference in milliseconds."""

    def __init__(self, path, cfg: BenchConfig, batch_size: int):
        import time

        self._clock = time.perf_counter
        self.session = create_session(path, cfg.provider, cfg.threads)
        name = self.session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
        if cfg.provider == "cuda":
            # Inputs and outputs stay on the device: the timing is the model, not the copies.
            import onnxruntime as ort

            self.binding = self.session.io_binding()
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            self.binding.bind_output(self.session.get_outputs()[0].name, "cuda")
            self._call = lambda: self.session.run_with_iobinding(self.binding)
        else:
            feed = {name: x}
            self._call = lambda: self.session.run(None, feed)

    def run(self) -> float:
        start = self._clock()
        self._call()
        return (self._clock() - start) * 1000.0

    def settle(self, ms: float) -> None:
        """Untimed runs for `ms` milliseconds, one at least: the cores are this model's again."""
        end = self._clock() + ms / 1000.0
        self._call()
        while self._clock() < end:
            self._call()


def bench(models: list[str | os.PathLike], cfg: BenchConfig, progress=None) -> list[dict]:
    """Rows of the CLI contract: model, provider, batch_size, p50/p90/p99 ms, images/s, speedup, and the CPU
    with its instruction sets (int8 kernels run faster with VNNI, narrow layers slower with AVX-512 blocks)."""
    for path in models:
        load_onnx(path)  # validate every file before spending time on any
    rows, cpu = [], {"cpu": cpu_model(), "instruction_sets": instruction_sets()}
    for batch_size in cfg.batch_sizes:
        runners = [_Runner(path, cfg, batch_size) for path in models]
        for _ in range(cfg.warmup):
            for r in runners:
                r.run()
        times = [[] for _ in runners]
        switching = len(runners) > 1  # one model alone runs back to back: nothing to settle
        for _ in range(cfg.repeats):
            for r, t in zip(runners, times):
                if switching:
                    r.settle(cfg.settle_ms)
                t.append(r.run())
        if progress:
            progress(batch_size)
        base_p50 = float(np.median(times[0]))
        for path, t in zip(models, times):
            p50, p90, p99 = (float(np.percentile(t, q)) for q in (50, 90, 99))
            rows.append({"model": str(path), "provider": cfg.provider, "batch_size": batch_size,
                         "p50_ms": round(p50, 4), "p90_ms": round(p90, 4), "p99_ms": round(p99, 4),
                         "images_per_s": round(batch_size / (p50 / 1000.0), 1),
                         "speedup": round(base_p50 / p50, 4),
                         "session_rss_bytes": session_memory(path, batch_size, PROVIDERS[cfg.provider]), **cpu})
    return rows
