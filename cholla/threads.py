"""How many threads torch computes with: one per physical core we may run on, fewer for prompts when busy.

PyTorch defaults to one thread per logical CPU; on machines with SMT two
threads then share one core's vector units and memory port, which slows the
matrix kernels down instead of speeding them up. And a core that another
program keeps busy is not ours either, but what that costs depends on the step:

- A decode step runs in one C++ call whose team hands out each product in
  chunks (``kernels/team.h``): a member the OS has descheduled has the rest of
  its share taken by the others. Such a step keeps the full team, busy or not.
- A prompt's products (oneDNN's, PyTorch's, cholla's ``qmatmul``) split their
  work statically: a member that waits for its core holds up all the others at
  the region's end. Those steps leave out the cores that other programs keep
  busy, measured from ``/proc/stat`` at most once a second
  (``LOAD_INTERVAL_SECONDS``), since a server runs for days and the load moves
  (``StepThreads``; a log line says when the count changes).

``--threads N`` or ``$OMP_NUM_THREADS`` fix one count for every step.
Switching between the two counts costs libgomp nothing when the smaller is 1
(a one-thread region does not touch the thread pool); between two larger
counts it ends and restarts the difference in threads (docs/benchmarks.md,
"Threads per step").
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from cholla.errors import InvalidRequestError

log = logging.getLogger("cholla")

# How long ``busy_cores`` watches the CPUs: long enough for a few scheduler
# ticks (4 ms at 250 Hz), short enough not to be felt at start.
LOAD_SAMPLE_SECONDS = 0.1
# How often a prompt step's thread count may be decided again: a reading of
# /proc/stat costs tens of microseconds, and a second holds 100 ticks a CPU.
LOAD_INTERVAL_SECONDS = 1.0
# How far the measured busy cores must move from the count in use before it
# changes (more than rounding's 0.5): a busy loop on one of two cores measures
# 0.67 to 1.0 while our own two threads compete with it, and noise of a few
# tenths of a core must not flip the count (and the log) every second.
BUSY_MARGIN_CORES = 0.6


def _our_cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def physical_cores(cpuinfo_path: str = "/proc/cpuinfo") -> int:
    """Distinct (package, core) pairs among the CPUs this process may use.

    Falls back to the number of usable CPUs where ``/proc/cpuinfo`` does not
    name cores (non-Linux, some VMs and ARM kernels).
    """
    allowed = _our_cpus()
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
            if not line.startswith("cpu"):
                break  # the CPU lines come first; the rest (a long interrupt line) is not read
            name, *fields = line.split()
            if name == "cpu" or int(name[3:]) not in cpus:
                continue
            ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(cores: int, stat_path: str = "/proc/stat", seconds: float = LOAD_SAMPLE_SECONDS) -> int:
    """How many of our ``cores`` other programs keep busy: the CPUs' busy share over ``seconds``, in cores.

    Our own process sleeps meanwhile (what it takes is left out: ``others_busy``),
    so what is busy is someone else. 0 where ``/proc/stat`` cannot be read (non-Linux).
    """
    before = read_cpu(stat_path)
    if before is None:
        return 0
    time.sleep(seconds)
    after = read_cpu(stat_path)
    return round(others_busy(before, after, cores, ticks_per_second())) if after is not None else 0


def threads_for_load(cores: int, busy: int) -> int:
    """One thread per core that is not busy, at least one."""
    return max(1, cores - busy)


@dataclass(frozen=True)
class CpuReading:
    """One look at the CPUs: ``/proc/stat``'s busy and total ticks over ours, and our own CPU time."""

    busy_ticks: int
    total_ticks: int
    own_seconds: float  # this process's user + system time, every thread's
    at: float  # time.monotonic()


def read_cpu(stat_path: str = "/proc/stat") -> CpuReading | None:
    """The CPUs now; None where ``/proc/stat`` cannot be read (non-Linux)."""
    try:
        busy, total = _cpu_times(stat_path, _our_cpus())
    except (OSError, ValueError):
        return None
    return CpuReading(busy, total, time.process_time(), time.monotonic())


def ticks_per_second() -> float:
    """``/proc/stat``'s ticks per second of one CPU."""
    return float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def others_busy(before: CpuReading, after: CpuReading, cores: int, ticks_per_second: float) -> float:
    """Cores that other programs kept busy between two readings: the busy share less our own, in cores.

    While every CPU is busy this is the share the others got, not the share
    they wanted (two busy loops against our two threads on two cores get one
    core): an underestimate, which the hysteresis of ``settle_busy`` allows for.
    """
    total = after.total_ticks - before.total_ticks
    if total <= 0:
        return 0.0
    ours = (after.own_seconds - before.own_seconds) * ticks_per_second
    return cores * min(1.0, max(0.0, (after.busy_ticks - before.busy_ticks - ours) / total))


def settle_busy(current: int, measured: float, cores: int) -> int:
    """The busy cores to plan for: ``current`` until ``measured`` moves ``BUSY_MARGIN_CORES`` away from it."""
    if abs(measured - current) < BUSY_MARGIN_CORES:
        return current
    return min(cores, max(0, round(measured)))


@dataclass
class StepThreads:
    """The adaptive default: the full team for decode steps, one thread per free core for prompt steps.

    ``busy`` (cores other programs keep busy) is measured again at most every
    ``LOAD_INTERVAL_SECONDS``, from the ``/proc/stat`` ticks since the last
    reading: after an idle spell the first prompt step sees the load of that
    whole spell, the next ones that of the last second.
    """

    cores: int
    busy: int
    last: CpuReading | None
    ticks_per_second: float = field(default_factory=ticks_per_second)

    @property
    def prompt_threads(self) -> int:
        return threads_for_load(self.cores, self.busy)

    def update(self, now: CpuReading | None) -> bool:
        """Take ``now`` as the latest reading if the interval has passed; True when ``busy`` changed."""
        if now is None or self.last is None or now.at - self.last.at < LOAD_INTERVAL_SECONDS:
            return False
        measured = others_busy(self.last, now, self.cores, self.ticks_per_second)
        self.last = now
        busy, self.busy = self.busy, settle_busy(self.busy, measured, self.cores)
        if self.busy != busy:
            log.warning("prompt steps now take %d of %d threads: %.1f of %d cores busy (decode steps keep %d)",
                        self.prompt_threads, self.cores, measured, self.cores, self.cores)
        return self.busy != busy

    def for_step(self, decoding: bool) -> int:
        """The threads a step takes; looks at the CPUs (a file read) at most every ``LOAD_INTERVAL_SECONDS``."""
        if decoding:
            return self.cores
        if self.last is not None and time.monotonic() - self.last.at >= LOAD_INTERVAL_SECONDS:
            self.update(read_cpu())
        return self.prompt_threads


# The process's adaptive default, once an engine has set one (None: the count stays as set).
_step_threads: StepThreads | None = None


def omp_num_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when the user set it to a count (every OpenMP program honours it), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads``, fixed; or, by default, adapt each step's to the load.

    Returns the count set now: ``threads``, ``$OMP_NUM_THREADS``, or one per
    physical core (the decode steps' team; prompt steps take fewer while other
    programs keep cores busy, said in the log).
    """
    global _step_threads
    if threads is not None and threads < 1:
        raise InvalidRequestError(f"threads must be at least 1, got {threads}")
    count = threads or omp_num_threads() or physical_cores()
    _step_threads = None
    if threads is None and omp_num_threads() is None and count > 1:
        busy = busy_cores(count)
        _step_threads = StepThreads(count, busy, read_cpu())
        if busy:
            log.warning("prompt steps take %d of %d threads: %d of %d cores busy; decode steps keep %d "
                        "(--threads or $OMP_NUM_THREADS to fix one count)",
                        _step_threads.prompt_threads, count, busy, count, count)
    torch.set_num_threads(count)
    return count


def step_threads(decoding: bool) -> int:
    """Give torch the threads this step should take under the adaptive default; returns the count in use.

    Called before each model step, on the thread that runs it (OpenMP's count
    is that thread's). A no-op when the count is fixed.
    """
    if _step_threads is None:
        return torch.get_num_threads()
    threads = _step_threads.for_step(decoding)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
