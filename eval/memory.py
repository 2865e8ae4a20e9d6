"""Resident memory an ONNX Runtime session of a model takes (weights materialised, arena included).

Measured in a fresh child process, so nothing else that this process imported or allocated
counts: peak RSS after loading the session and running one batch, minus the RSS before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort

def rss(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0

path, batch, provider = sys.argv[1], int(sys.argv[2]), sys.argv[3]
x = np.zeros((batch, 3, 32, 32), np.float32)
before = rss("VmRSS:")
session = ort.InferenceSession(path, providers=[provider])
session.run(None, {session.get_inputs()[0].name: x})
print(json.dumps({"session_rss_bytes": rss("VmHWM:") - before}))
"""


def session_memory(path: str | os.PathLike, batch_size: int = 1, provider: str = "CPUExecutionProvider") -> int | None:
    """Bytes of resident memory a session takes; None where /proc is not available."""
    if not os.path.exists("/proc/self/status"):
        return None
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(batch_size), provider],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["session_rss_bytes"]
