"""How many threads torch computes with: one per physical core we may run on.

PyTorch defaults to one thread per logical CPU; on machines with SMT two
threads then share one core's vector units and memory port, which slows the
matrix kernels down instead of speeding them up.
"""

from __future__ import annotations

import os

import torch

from cholla.errors import InvalidRequestError


def physical_cores(cpuinfo_path: str = "/proc/cpuinfo") -> int:
    """Distinct (package, core) pairs among the CPUs this process may use.

    Falls back to the number of usable CPUs where ``/proc/cpuinfo`` does not
    name cores (non-Linux, some VMs and ARM kernels).
    """
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        with open(cpuinfo_path) as f:
            sections = f.read().split("\n\n")
    except OSError:
        return len(allowed)
    for section in sections:
        fields = dict(line.split(":", 1) for line in section.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "processor" not in fields or "core id" not in fields:
            continue
        if int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or len(allowed)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when the user set it (as every OpenMP program honours), else one per physical core."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    return physical_cores()


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads``, default ``default_threads()``; returns it."""
    if threads is not None and threads < 1:
        raise InvalidRequestError(f"threads must be at least 1, got {threads}")
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count
