"""What the CPU offers ONNX Runtime: instruction sets and the channel block of its convolutions.

Measured speed-ups depend on it (a width below the block costs the whole block), so the bench
records it beside every timing and method second's latency allocation plans with it.
"""

from __future__ import annotations

import os
import platform


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def instruction_sets() -> dict[str, bool]:
    """The x86 extensions that change ONNX Runtime's kernels: AVX2, AVX-512 and VNNI (int8 dot products)."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}


def channel_block() -> int:
    """Channels per block of ONNX Runtime's CPU convolutions: 16 with AVX-512, 8 with AVX2, else 1."""
    isa = instruction_sets()
    return 16 if isa["avx512"] else 8 if isa["avx2"] else 1


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict:
    """Where latencies are measured: CPU, cores, channel block, instruction sets, ONNX Runtime."""
    import onnxruntime

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "channel_block": channel_block(),
            "instruction_sets": instruction_sets(), "onnxruntime": onnxruntime.__version__}
