"""How many threads torch computes with: one per physical core we may run on and find free.

PyTorch defaults to one thread per logical CPU; on machines with SMT two
threads then share one core's vector units and memory port, which slows the
matrix kernels down instead of speeding them up. And a core that another
program keeps busy is not ours either: a team of threads meets several times
per layer, and a member that waits for its core holds up all the others, so
the default leaves out the cores that were busy when the engine started
(``busy_cores``), and says so in the log.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from cholla.errors import InvalidRequestError

log = logging.getLogger("cholla")

# How long ``busy_cores`` watches the CPUs: long enough for a few scheduler
# ticks (4 ms at 250 Hz), short enough not to be felt at start.
LOAD_SAMPLE_SECONDS = 0.1


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


def _cpu_times(stat_path: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) jiffies summed over ``cpus`` from ``/proc/stat``'s ``cpuN`` lines.

    Idle and I/O wait count as free; everything else (user, nice, system,
    interrupts, and steal: time the hypervisor gave to someone else) as busy.
    """
    busy = total = 0
    with open(stat_path) as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(cores: int, stat_path: str = "/proc/stat", seconds: float = LOAD_SAMPLE_SECONDS) -> int:
    """How many of our ``cores`` other programs keep busy: the CPUs' busy share over ``seconds``, in cores.

    Our own process sleeps meanwhile, so what is busy is someone else. 0 where
    ``/proc/stat`` cannot be read (non-Linux).
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        busy_before, total_before = _cpu_times(stat_path, cpus)
        time.sleep(seconds)
        busy_after, total_after = _cpu_times(stat_path, cpus)
    except (OSError, ValueError):
        return 0
    if total_after <= total_before:
        return 0
    return round(cores * (busy_after - busy_before) / (total_after - total_before))


def threads_for_load(cores: int, busy: int) -> int:
    """One thread per core that is not busy, at least one."""
    return max(1, cores - busy)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when the user set it (as every OpenMP program honours), else one per free physical core."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    cores = physical_cores()
    busy = busy_cores(cores) if cores > 1 else 0
    threads = threads_for_load(cores, busy)
    if busy:
        log.warning("using %d thread%s: %d of %d cores busy (--threads or $OMP_NUM_THREADS to choose)",
                    threads, "" if threads == 1 else "s", busy, cores)
    return threads


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads``, default ``default_threads()``; returns it."""
    if threads is not None and threads < 1:
        raise InvalidRequestError(f"threads must be at least 1, got {threads}")
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count
