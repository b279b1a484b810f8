"""The decode team's barrier (cholla/kernels/barrier.h), built alone into a small
driver program: every member sees every stage complete, a busy machine does not
stall the team (waiters sleep instead of spinning through the late member's
time slice), and a failed member releases the others even when they sleep.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "cholla" / "kernels"

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or shutil.which("g++") is None,
    reason="the barrier is for Linux on x86-64 (futex, pause) and needs g++",
)

# Members add to a shared counter, meet, check that everyone added for this
# stage and nobody for the next, meet again. Member 0 may fail (after a nap, so
# that the others are asleep by then) before stage `fail_at`.
DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
#include "barrier.h"

int main(int argc, char** argv) {
  const int threads = std::atoi(argv[1]), rounds = std::atoi(argv[2]), spin = std::atoi(argv[3]);
  const int fail_at = std::atoi(argv[4]);
  cholla::Barrier barrier(threads, spin);
  std::atomic<long long> counter{0};
  std::atomic<bool> ok{true};
  std::vector<int> passed(threads, 0);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> team;
  for (int t = 0; t < threads; ++t)
    team.emplace_back([&, t] {
      for (int r = 0; r < rounds; ++r) {
        if (t == 0 && r == fail_at) {
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          barrier.fail();
          return;
        }
        counter.fetch_add(1);
        if (!barrier.wait()) return;
        if (counter.load() != 1LL * threads * (r + 1)) ok = false;
        ++passed[t];
        if (!barrier.wait()) return;
      }
    });
  for (auto& member : team) member.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%d %.4f %lld", ok ? 1 : 0, seconds, static_cast<long long>(barrier.sleeps()));
  for (int p : passed) std::printf(" %d", p);
  std::printf("\n");
}
"""


@dataclass
class Run:
    ok: bool  # no member saw a stage incomplete
    seconds: float
    sleeps: int  # waits that went to sleep
    passed: list[int]  # stages each member saw complete


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("barrier")
    (folder / "driver.cpp").write_text(DRIVER)
    binary = folder / "driver"
    subprocess.run(["g++", "-O2", "-std=c++17", "-pthread", f"-I{KERNELS}", str(folder / "driver.cpp"), "-o",
                    str(binary)], check=True)
    return binary


def _run(driver: Path, threads: int, rounds: int, spin_us: int, fail_at: int = -1) -> Run:
    out = subprocess.run([str(driver), str(threads), str(rounds), str(spin_us), str(fail_at)], check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    return Run(out[0] == "1", float(out[1]), int(out[2]), [int(p) for p in out[3:]])


def test_oversubscribed_under_load_stays_correct_and_quick(driver):
    """Twice as many members as CPUs, each CPU also running a busy loop: members
    are descheduled all the time. A barrier that spins through it takes a
    time slice per stage (over 60 s for 4000 stages here, against 0.8 s for
    this one, which sleeps)."""
    cpus = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        run = _run(driver, threads=2 * cpus, rounds=1000, spin_us=30)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert run.ok and run.passed == [1000] * (2 * cpus)
    assert run.sleeps > 0  # the futex path ran
    assert run.seconds < 10, f"2000 stages took {run.seconds:.1f} s"


def test_spinning_only_is_still_correct(driver):
    """A spin budget longer than any wait: the barrier never sleeps."""
    run = _run(driver, threads=2, rounds=2000, spin_us=10_000_000)
    assert run.ok and run.passed == [2000, 2000] and run.sleeps == 0


def test_failure_wakes_sleeping_members(driver):
    """Member 0 fails before stage 100 after the others fell asleep waiting for it:
    they all wake, stop at that stage, and the program ends."""
    run = _run(driver, threads=4, rounds=1000, spin_us=0, fail_at=100)
    assert run.ok and run.passed == [100, 100, 100, 100]
    assert run.sleeps >= 3
    assert run.seconds < 10
