"""cholla: an LLM inference engine in Python on PyTorch.

``from cholla import LLM, SamplingParams``. Names are imported on first use so
that light commands (``cholla info``) start quickly.
"""

from __future__ import annotations

import importlib
import os

# OpenMP's idle threads (torch's, MKL's, our kernels') spin this many pauses
# (~30-60 us) waiting for the next parallel region before they sleep; libgomp's
# default, 300000 (~10 ms), burns the time slices a busy machine's other
# threads need, our own included (docs/benchmarks.md, contention). libgomp
# reads it once, as it loads with torch: so here, before anything of ours
# imports torch, unless the user chose a policy (OMP_WAIT_POLICY or
# GOMP_SPINCOUNT; README.md, speed options).
GOMP_SPINCOUNT = "1000"
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "cholla.llm",
    "SamplingParams": "cholla.sampling.params",
    "StructuredOutputsParams": "cholla.sampling.params",
    "RequestOutput": "cholla.engine.outputs",
    "CompletionOutput": "cholla.engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cholla' has no attribute {name!r}")
