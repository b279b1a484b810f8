"""cholla: an LLM inference engine in Python on PyTorch.

``from cholla import LLM, SamplingParams``. Names are imported on first use so
that light commands (``cholla info``) start quickly.
"""

from __future__ import annotations

import importlib

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
