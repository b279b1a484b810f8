"""Thread count: one per physical core, from /proc/cpuinfo, honouring the CPU affinity; prompt
steps leave out the cores /proc/stat shows busy (fake readings here, no timing); and OpenMP's
wait policy that cholla sets on import."""

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
from cholla.sampling.params import SamplingParams
from cholla.threads import (CpuReading, StepThreads, busy_cores, others_busy, physical_cores, set_threads, settle_busy,
                            step_threads, threads_for_load)
from tests.conftest import engine_on

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


@pytest.fixture
def torch_threads():
    """Restores torch's thread count and the process's adaptive default after a test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._step_threads = None


def test_set_threads(monkeypatch, torch_threads):
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 0)
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    assert threads._step_threads is None  # fixed: every step takes it
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_threads() == physical_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads() == 1 and torch.get_num_threads() == 1 and threads._step_threads is None
    with pytest.raises(InvalidRequestError):
        set_threads(0)


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


def test_default_keeps_the_team_for_decode_and_leaves_busy_cores_to_prompts(monkeypatch, caplog, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 3)
    monkeypatch.setattr(threads, "read_cpu", lambda: None)  # no later readings: the start's count stays
    with caplog.at_level(logging.INFO, logger="cholla"):
        assert set_threads() == 4 and torch.get_num_threads() == 4
    assert "prompt steps take 1 of 4 threads: 3 of 4 cores busy; decode steps keep 4" in caplog.text
    assert step_threads(decoding=False) == 1 and torch.get_num_threads() == 1
    assert step_threads(decoding=True) == 4 and torch.get_num_threads() == 4
    caplog.clear()
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 0)
    with caplog.at_level(logging.INFO, logger="cholla"):
        assert set_threads() == 4
    assert "busy" not in caplog.text
    assert step_threads(decoding=False) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands, busy or not, for every step
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 3)
    assert set_threads() == 3
    assert step_threads(decoding=False) == 3 and step_threads(decoding=True) == 3


def _reading(busy: int, total: int, own: float, at: float) -> CpuReading:
    return CpuReading(busy_ticks=busy, total_ticks=total, own_seconds=own, at=at)


def test_others_busy_leaves_out_our_own_time():
    # 2 cores at 100 ticks a second, over one second: 200 ticks, 150 of them busy.
    before = _reading(1000, 5000, 10.0, 0.0)
    assert others_busy(before, _reading(1150, 5200, 11.0, 1.0), 2, 100) == pytest.approx(0.5)  # we took 1 core
    assert others_busy(before, _reading(1150, 5200, 10.0, 1.0), 2, 100) == pytest.approx(1.5)  # we slept
    # Our time counted at a finer grain than the ticks: never below 0 or above every core.
    assert others_busy(before, _reading(1100, 5200, 12.0, 1.0), 2, 100) == 0.0
    assert others_busy(before, _reading(1000, 5000, 10.0, 1.0), 2, 100) == 0.0  # no ticks: nothing known


def test_settle_busy_moves_only_past_the_margin():
    assert settle_busy(0, 0.4, 2) == 0  # noise
    assert settle_busy(0, 0.67, 2) == 1  # a busy loop beside our two threads on two cores
    assert settle_busy(1, 0.67, 2) == 1 and settle_busy(1, 1.5, 2) == 1
    assert settle_busy(1, 0.5, 2) == 1 and settle_busy(1, 0.3, 2) == 0
    assert settle_busy(2, 1.5, 2) == 2 and settle_busy(0, 1.8, 2) == 2
    assert settle_busy(0, 11.0, 8) == 8


def test_step_threads_follow_the_load_at_most_once_an_interval(monkeypatch, caplog):
    clock = {"now": 100.0}
    readings: list[CpuReading] = []

    def read_cpu() -> CpuReading:
        readings.append(_reading(0, 0, 0.0, clock["now"]))  # only the count of reads matters here
        return readings[-1]

    monkeypatch.setattr(threads, "read_cpu", read_cpu)
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["now"])
    measured = iter([1.0, 0.9, 0.1])
    monkeypatch.setattr(threads, "others_busy", lambda before, after, cores, ticks: next(measured))
    policy = StepThreads(cores=2, busy=0, last=_reading(0, 0, 0.0, 100.0))
    assert policy.for_step(decoding=False) == 2 and not readings  # within the interval: no reading
    clock["now"] += threads.LOAD_INTERVAL_SECONDS
    with caplog.at_level(logging.INFO, logger="cholla"):
        assert policy.for_step(decoding=True) == 2 and not readings  # decode steps never look
        assert policy.for_step(decoding=False) == 1 and len(readings) == 1  # a busy loop came
        assert policy.for_step(decoding=False) == 1 and len(readings) == 1
    assert "prompt steps now take 1 of 2 threads: 1.0 of 2 cores busy (decode steps keep 2)" in caplog.text
    caplog.clear()
    clock["now"] += 5 * threads.LOAD_INTERVAL_SECONDS
    with caplog.at_level(logging.INFO, logger="cholla"):
        assert policy.for_step(decoding=False) == 1  # 0.9: still busy
    assert not caplog.text
    clock["now"] += threads.LOAD_INTERVAL_SECONDS
    assert policy.for_step(decoding=False) == 2 and len(readings) == 3  # it went away


def test_engine_steps_take_their_threads(smollm2_loaded, monkeypatch, torch_threads):
    """The runner gives prompt steps the prompt count and decode steps the team, on the thread that runs them."""
    engine = engine_on(smollm2_loaded, monkeypatch, dtype="float32")
    monkeypatch.setattr(threads, "_step_threads", StepThreads(cores=2, busy=1, last=None))
    seen: list[int] = []

    def recording(run):
        def recorded(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return run(*args, **kwargs)
        return recorded

    model = engine.runner.model  # decode steps run through decode_logits (the head in the same call)
    monkeypatch.setattr(model, "forward", recording(model.forward))
    monkeypatch.setattr(model, "decode_logits", lambda *args: recording(type(model).decode_logits)(model, *args))
    engine.add_request("a", [1, 504, 3458, 282], SamplingParams(temperature=0, max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()
    assert seen == [1, 2, 2]  # the prompt, then two decode steps


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
