"""The decode team's work sharing (cholla/kernels/team.h), built alone into a
small driver program: every job of every stage is done exactly once, and each
stage's serial step sees all of them; a member that is away does not stop the
others (its chunks are taken), nor does a busy machine (waiters sleep instead of
spinning through a late member's time slice); a failed member releases the
others even when they sleep.
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
    reason="the team is for Linux on x86-64 (futex, pause) and needs g++",
)

# Stage s has jobs(s) jobs (0, 1, a few, many, odd); each job adds one to its own
# counter. The stage's serial step checks that every job of the stage was done
# exactly once, and marks the stage closed; every member checks the mark when
# finish() returns. Modes:
#   run:     every member takes part;
#   away:    member 1 starts only once member 0 has finished every stage (or
#            after 10 s, which the output tells): member 0 must do it all;
#   holding: the member that takes job 0 of stage `at` naps 50 ms on it, so
#            the others wait for that chunk (they cannot take it) and sleep;
#   fail:    the member that takes job 0 of stage `at` naps, then fails.
# Output: ok, seconds, sleeps, then per member the stages it finished and the
# chunks it took; with `away`, whether member 0 finished alone and whether it
# took every stage's jobs in order (its own chunks, then member 1's).
DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>
#include "team.h"

int64_t jobs(int s) { const int64_t n[] = {37, 1, 0, 5, 1000, 2, 64, 3, 17, 129}; return n[s % 10]; }

int main(int argc, char** argv) {
  const int members = std::atoi(argv[1]), stages = std::atoi(argv[2]), spin = std::atoi(argv[3]);
  const std::string mode = argv[4];
  const int at = std::atoi(argv[5]);
  cholla::Team team(members, spin);
  std::vector<std::vector<std::atomic<int>>> hits(stages);
  for (int s = 0; s < stages; ++s) hits[s] = std::vector<std::atomic<int>>(jobs(s));
  std::vector<std::atomic<int>> closed(stages);
  std::atomic<bool> ok{true}, zero_finished{false}, zero_alone{false}, in_order{true};
  std::vector<int> finished(members, 0), chunks(members, 0);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < members; ++t)
    threads.emplace_back([&, t] {
      cholla::Member member(team, t);
      if (t == 1 && mode == "away") {
        for (int i = 0; i < 10000 && !zero_finished; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        zero_alone = zero_finished.load();
      }
      for (int s = 0; s < stages; ++s) {
        int64_t begin, end, expect = 0;
        while (member.next(jobs(s), begin, end)) {
          if (begin != expect) in_order = false;
          expect = end;
          ++chunks[t];
          for (int64_t j = begin; j < end; ++j) hits[s][j].fetch_add(1);
          if (s == at && begin == 0 && end > 0 && (mode == "holding" || mode == "fail")) {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
            if (mode == "fail") {
              team.fail();
              return;
            }
          }
        }
        if (t == 0 && expect != jobs(s)) in_order = false;
        const bool go_on = member.finish([&] {
          for (auto& h : hits[s]) if (h.load() != 1) ok = false;
          closed[s].fetch_add(1);
        });
        if (!go_on) return;
        if (closed[s].load() != 1) ok = false;
        ++finished[t];
      }
      if (t == 0) zero_finished = true;
    });
  for (auto& thread : threads) thread.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%d %.4f %lld", ok ? 1 : 0, seconds, static_cast<long long>(team.sleeps()));
  for (int t = 0; t < members; ++t) std::printf(" %d:%d", finished[t], chunks[t]);
  if (mode == "away") std::printf(" alone=%d in_order=%d", zero_alone ? 1 : 0, in_order ? 1 : 0);
  std::printf("\n");
}
"""


# Each member's own chunks (OwnChunks) of n jobs for 0 <= n < 3000 and 1-4 members: they follow each other
# from its range's start to its end, none empty (but a stage of no jobs' one, member 0's), every job in exactly
# one; the last even chunk cut in halves (tail pieces, then one job). Prints the number of faults, then the
# chunks' sizes of one member's 128 jobs.
CHUNKS = r"""
#include <cstdio>
#include <vector>
#include "team.h"

int main() {
  int faults = 0;
  for (int members = 1; members <= 4; ++members)
    for (int64_t n = 0; n < 3000; ++n) {
      std::vector<int> hits(n, 0);
      int64_t chunks = 0;
      for (int m = 0; m < members; ++m) {
        const cholla::OwnChunks own(n, m, members);
        chunks += own.count;
        int64_t at = own.begin;
        for (int64_t i = 0; i < own.count; ++i) {
          const auto [begin, end] = own.chunk(i);
          if (begin != at || end < begin || (n > 0 && end == begin)) ++faults;
          for (int64_t j = begin; j < end; ++j) ++hits[j];
          at = end;
        }
        if (at != own.begin + own.size) ++faults;
      }
      for (int h : hits) faults += h != 1;
      faults += chunks != cholla::stage_chunks(n, members) || (n == 0 && chunks != 1);
    }
  std::printf("%d", faults);
  const cholla::OwnChunks own(128, 0, 1);
  for (int64_t i = 0; i < own.count; ++i) std::printf(" %lld", static_cast<long long>(own.chunk(i).second - own.chunk(i).first));
  std::printf("\n");
}
"""


@dataclass
class Run:
    ok: bool  # every job done once per stage, every serial step after them and before the next stage
    seconds: float
    sleeps: int  # waits that went to sleep
    finished: list[int]  # stages each member saw closed
    chunks: list[int]  # chunks each member took
    flags: dict[str, bool]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("team")
    (folder / "driver.cpp").write_text(DRIVER)
    binary = folder / "driver"
    subprocess.run(["g++", "-O2", "-std=c++17", "-pthread", f"-I{KERNELS}", str(folder / "driver.cpp"), "-o",
                    str(binary)], check=True)
    return binary


def _run(driver: Path, members: int, stages: int, spin_us: int, mode: str = "run", at: int = -1) -> Run:
    out = subprocess.run([str(driver), str(members), str(stages), str(spin_us), mode, str(at)], check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    per_member = [tuple(int(v) for v in field.split(":")) for field in out[3:3 + members]]
    flags = {k: v == "1" for k, v in (field.split("=") for field in out[3 + members:])}
    return Run(out[0] == "1", float(out[1]), int(out[2]), [f for f, _ in per_member], [c for _, c in per_member],
               flags)


def test_chunks_cover_every_job_once_and_end_in_halves(tmp_path):
    """A member's chunks tile its range, for every job count up to 3000 and 1-4 members; 128
    jobs are 7 chunks of 16, then the last 16 in halves down to one job."""
    (tmp_path / "chunks.cpp").write_text(CHUNKS)
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{KERNELS}", str(tmp_path / "chunks.cpp"), "-o",
                    str(tmp_path / "chunks")], check=True)
    out = subprocess.run([str(tmp_path / "chunks")], check=True, capture_output=True, text=True).stdout.split()
    assert out[0] == "0"
    assert [int(size) for size in out[1:]] == [16] * 7 + [8, 4, 2, 1, 1]


@pytest.mark.parametrize("members", [1, 2, 3, 4])
def test_every_job_is_done_once_by_one_to_four_members(driver, members):
    """Stages of 0 to 1000 jobs (odd counts among them), each member taking its own chunks and the
    others' as they come: every job of every stage done exactly once before its serial step."""
    run = _run(driver, members=members, stages=200, spin_us=30)
    assert run.ok and run.finished == [200] * members


def test_a_member_away_has_its_chunks_taken(driver):
    """Member 1 does not start until member 0 has finished every stage: member 0
    takes its own chunks, then member 1's, in order, and closes every stage;
    member 1 then finds them all closed and catches up without taking any. (A
    team that waits for every member at each stage, as a barrier does, would
    wait 10 s here and fail.)"""
    run = _run(driver, members=2, stages=70, spin_us=30, mode="away")
    assert run.flags == {"alone": True, "in_order": True}
    assert run.ok and run.finished == [70, 70] and run.chunks[1] == 0


def test_a_member_holding_a_chunk_is_waited_for(driver):
    """The member that takes stage 4's first job naps on it: the others cannot
    take a chunk in hand, so the stage's serial step waits for it (they sleep
    meanwhile), and sees its jobs done."""
    run = _run(driver, members=3, stages=14, spin_us=30, mode="holding", at=4)
    assert run.ok and run.finished == [14, 14, 14]
    assert run.sleeps >= 2


def test_oversubscribed_under_load_stays_correct_and_quick(driver):
    """Twice as many members as CPUs, each CPU also running a busy loop: members
    are descheduled all the time. (A barrier that spun through it took over 60 s
    for 4000 stages here.)"""
    cpus = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        run = _run(driver, members=2 * cpus, stages=2000, spin_us=30)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert run.ok and run.finished == [2000] * (2 * cpus)
    assert run.seconds < 10, f"2000 stages took {run.seconds:.1f} s"


def test_spinning_only_is_still_correct(driver):
    """A spin budget longer than any wait: the team never sleeps."""
    run = _run(driver, members=2, stages=2000, spin_us=10_000_000)
    assert run.ok and run.finished == [2000, 2000] and run.sleeps == 0


def test_failure_wakes_sleeping_members(driver):
    """The member that takes stage 95's first job fails while holding it, after
    the others fell asleep waiting for it to finish: they all wake and stop
    there, and the program ends."""
    run = _run(driver, members=4, stages=1000, spin_us=0, mode="fail", at=95)
    assert run.ok and run.finished == [95] * 4
    assert run.sleeps >= 3
    assert run.seconds < 10
