"""Thread count: one per free physical core, from /proc/cpuinfo and /proc/stat,
honouring the CPU affinity; and OpenMP's wait policy that cholla sets on import."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from cholla import threads
from cholla.errors import InvalidRequestError
from cholla.threads import busy_cores, default_threads, physical_cores, set_threads, threads_for_load

# Two cores with two hyper-threads each: logical CPUs 0/2 share core 0, 1/3 core 1.
SMT_CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\nflags\t\t: avx512f" for cpu in range(4)
)


def test_hyperthreads_count_once(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(SMT_CPUINFO)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert physical_cores(str(path)) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})  # pinned to core 0's two threads
    assert physical_cores(str(path)) == 1


def test_without_core_ids_falls_back_to_usable_cpus(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n\nprocessor\t: 1\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert physical_cores(str(path)) == 2


def test_set_threads(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 0)
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads() == physical_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        with pytest.raises(InvalidRequestError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def _stat(cpu_ticks: dict[int, list[int]]) -> str:
    """A /proc/stat with ``cpuN user nice system idle iowait irq softirq steal guest guest_nice`` lines."""
    lines = ["cpu  " + " ".join(str(sum(column)) for column in zip(*cpu_ticks.values())) + " 0 0"]
    lines += [f"cpu{cpu} " + " ".join(map(str, ticks)) + " 0 0" for cpu, ticks in cpu_ticks.items()]
    return "\n".join(lines + ["intr 12345 0", "ctxt 999", "btime 1700000000", "procs_running 3"]) + "\n"


def test_busy_cores_from_proc_stat(tmp_path, monkeypatch):
    path = tmp_path / "stat"
    before = {0: [100, 0, 50, 1000, 10, 0, 0, 0], 1: [100, 0, 50, 1000, 10, 0, 0, 0], 2: [0, 0, 0, 500, 0, 0, 0, 0]}
    # Over the sample: CPU 0 busy (90 user, 5 system, 5 idle), CPU 1 idle but for
    # 5 ticks of I/O wait (free), CPU 2 busy with stolen time.
    after = {0: [190, 0, 55, 1005, 10, 0, 0, 0], 1: [100, 0, 50, 1095, 15, 0, 0, 0], 2: [10, 0, 0, 510, 0, 0, 0, 80]}
    path.write_text(_stat(before))
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: path.write_text(_stat(after)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert busy_cores(2, str(path)) == 1
    path.write_text(_stat(before))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert busy_cores(1, str(path)) == 0
    path.write_text(_stat(before))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert busy_cores(3, str(path)) == 2
    assert busy_cores(2, str(tmp_path / "missing")) == 0


def test_threads_for_load():
    assert threads_for_load(2, 0) == 2
    assert threads_for_load(2, 1) == 1
    assert threads_for_load(2, 2) == 1  # every core busy: one thread still runs
    assert threads_for_load(8, 3) == 5


def test_default_threads_leave_out_busy_cores(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 3)
    with caplog.at_level(logging.INFO, logger="cholla"):
        assert default_threads() == 1
    assert "using 1 thread: 3 of 4 cores busy" in caplog.text
    caplog.clear()
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 0)
    with caplog.at_level(logging.INFO, logger="cholla"):
        assert default_threads() == 4
    assert "busy" not in caplog.text
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands, busy or not
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 3)
    assert default_threads() == 3


# Two threads run one parallel region, then idle 5 ms, 40 times: how much CPU the
# process spends while idle. libgomp's default keeps the idle thread spinning
# (~10 ms of pauses); the spin cholla sets lets it sleep within ~50 us.
IDLE_SPIN = """
import time
import cholla
import torch
torch.set_num_threads(2)
x = torch.randn(1 << 20)
spent = 0.0
for _ in range(40):
    x.mul_(1.0)
    start = time.process_time()
    time.sleep(0.005)
    spent += time.process_time() - start
print(spent)
"""


@pytest.mark.skipif(platform.system() != "Linux" or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="GOMP_SPINCOUNT is libgomp's, torch's OpenMP on Linux")
def test_openmp_threads_sleep_soon(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    def idle_cpu_seconds(env: dict[str, str]) -> float:
        out = subprocess.run([sys.executable, "-c", IDLE_SPIN], env={**os.environ, **env}, check=True,
                             capture_output=True, text=True, timeout=120)
        return float(out.stdout)

    ours = idle_cpu_seconds({})
    assert ours < 0.1 * 0.2  # of 40 x 5 ms idle
    # The user's own policy stands: libgomp's default spin, measured alike.
    assert idle_cpu_seconds({"GOMP_SPINCOUNT": "300000"}) > 3 * max(ours, 0.005)
