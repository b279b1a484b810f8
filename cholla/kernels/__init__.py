"""Kernels of our own, in C++, compiled on first use and cached on disk.

``qgemv.cpp`` (decode) and ``qmatmul.cpp`` (AMX tiles, batches) multiply
activations with weights still in their GGUF blocks; ``norm_rope.cpp`` fuses
RMSNorm and the rotary embedding, ``activation.cpp`` the MLP's act(gate) * up;
``ssd.cpp`` takes Mamba-2's decode step on the state slots in place;
``paged_attention.cpp`` writes and attends decode tokens straight from the
paged KV cache; ``decode_layers.cpp`` chains them through every layer of a
decode step (``ops.h``); ``argmax.cpp`` serves greedy sampling;
``state_update.cpp`` steps the recurrent layers' states (the short convolution,
the gated delta rule) in their state-cache slots, and ``chunked_scan.cpp``
runs the same layers' prefill (the convolution over a prompt chunk, the
chunked delta rule and SSD); ``hybrid_decode.cpp`` runs a
Mamba-2 layer's, a Gated DeltaNet layer's or a mixture of experts' whole
decode step in one call;
``embedding.cpp`` looks up Q4_0 / Q8_0 embedding rows. They need a
C++ compiler at first use and a CPU with AVX512-BF16 and VNNI (Intel since
Cooper Lake, AMD since Zen 4); ``cpu_kernels()`` returns ``None`` elsewhere,
and the layers fall back to PyTorch ops. AMX tiles, where the CPU has them and
Linux grants them, speed up the batched products; elsewhere the same products
run on AVX512-BF16 dot products.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("cholla")

SOURCE_NAMES = ("qmatmul.cpp", "qgemv.cpp", "norm_rope.cpp", "paged_attention.cpp", "decode_layers.cpp", "argmax.cpp",
                "activation.cpp", "ssd.cpp", "state_update.cpp", "chunked_scan.cpp", "hybrid_decode.cpp",
                "embedding.cpp")
SOURCES = [str(Path(__file__).with_name(name)) for name in SOURCE_NAMES]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma")
AMX_FLAGS = ("amx_tile", "amx_bf16")
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


def build_name() -> str:
    """The extension's name, keyed by its folder, sources, headers and flags: torch builds each name in
    its own folder, so two checkouts (or versions) of cholla never overwrite each other's library,
    and never rebuild it in turn (``build.ninja`` names the sources by their absolute paths)."""
    digest = hashlib.blake2b(" ".join(COMPILER_FLAGS).encode(), digest_size=6)
    digest.update(str(Path(__file__).parent.resolve()).encode())
    for path in sorted(Path(__file__).parent.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    return f"cholla_kernels_{digest.hexdigest()}"


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` package's binary may not be there (pyenv, venvs)."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def cpu_kernels():
    """``torch.ops.cholla`` once built; ``None`` where they cannot run."""
    missing = [flag for flag in CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        log.info("C++ kernels off: the CPU lacks %s", ", ".join(missing))
        return None
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        load(name=build_name(), sources=SOURCES, extra_cflags=COMPILER_FLAGS, is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a failed build: fall back, never fail the model
        log.warning("C++ kernels off: building them failed (%s)", str(e).splitlines()[0] if str(e) else e)
        return None
    if has_amx_flags() and not torch.ops.cholla.request_amx():
        log.info("AMX tiles off: Linux refused the tile state (arch_prctl); batched products use AVX512-BF16")
    return torch.ops.cholla


def has_amx_flags() -> bool:
    return all(flag in cpu_flags() for flag in AMX_FLAGS)


@functools.cache
def amx_tiles() -> bool:
    """Whether the kernels' batched products run on AMX tiles (else on AVX512-BF16)."""
    return cpu_kernels() is not None and has_amx_flags() and bool(torch.ops.cholla.request_amx())
