"""Kernels of our own, in C++, compiled on first use and cached on disk.

``qgemv.cpp`` (decode) and ``qmatmul.cpp`` (AMX tiles, batches) multiply
activations with weights still in their GGUF blocks; ``norm_rope.cpp`` fuses
RMSNorm and the rotary embedding, ``activation.cpp`` the MLP's act(gate) * up;
``paged_attention.cpp`` writes and attends decode tokens straight from the
paged KV cache; ``decode_layers.cpp`` chains them through every layer of a
decode step (``ops.h``); ``argmax.cpp`` serves greedy sampling. They need a
C++ compiler at first use and a CPU with AMX-BF16 and AVX512-BF16;
``amx_kernels()`` returns ``None`` elsewhere, and the layers fall back to
PyTorch ops.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("cholla")

SOURCE_NAMES = ("qmatmul.cpp", "qgemv.cpp", "norm_rope.cpp", "paged_attention.cpp", "decode_layers.cpp", "argmax.cpp",
                "activation.cpp")
SOURCES = [str(Path(__file__).with_name(name)) for name in SOURCE_NAMES]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma", "amx_tile", "amx_bf16")
COMPILER_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mf16c", "-mfma", "-mavx512vnni"]
COMPILER_FLAGS += ["-mamx-tile", "-mamx-bf16"]


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` package's binary may not be there (pyenv, venvs)."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def amx_kernels():
    """``torch.ops.cholla`` once built and AMX is granted; ``None`` where they cannot run."""
    missing = [flag for flag in CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        log.info("AMX kernels off: the CPU lacks %s", ", ".join(missing))
        return None
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        load(name="cholla_kernels", sources=SOURCES, extra_cflags=COMPILER_FLAGS, is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a failed build: fall back, never fail the model
        log.warning("AMX kernels off: building them failed (%s)", str(e).splitlines()[0] if str(e) else e)
        return None
    if not torch.ops.cholla.request_amx():
        log.info("AMX kernels off: the kernel refused the AMX tile state (arch_prctl)")
        return None
    return torch.ops.cholla
