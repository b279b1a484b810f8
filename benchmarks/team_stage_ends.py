"""What a team's stage ends cost (cholla/kernels/team.h), this checkout's against another's, on synthetic stages.

Two threads run layers of stages shaped as a decode step's: ``gemma3``, nine stages of Gemma 3's
32-row step (the q/k/v, o, gate/up and down products' jobs of 16 weight rows, the attention's
sequences, the rows of the steps between them), ``smollm2``, the five of SmolLM2's one-row step.
Each job spins for its time (+-20%, fixed per job and layer); ``--skew`` makes member 1's jobs
that much slower (one core busier than the other). Each layer's time is read at the serial step
that closes its last stage; the table gives the p10 of a run's layers, best of ``--runs`` runs
that take turns, and the layer's work split evenly (what no stage end would cost):

    python benchmarks/team_stage_ends.py --baseline ../main --shape gemma3 --skew 1.0 1.1 1.25

Its jobs read no memory: it measures the claims and the waits at the stage ends, nothing else.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Stages as (jobs, ns a job); argv: shape, member 1's slowdown in percent, layers.
DRIVER = r"""
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>
#include "team.h"

using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  const std::vector<std::pair<int64_t, int64_t>> stages =
      std::string(argv[1]) == "smollm2"
          ? std::vector<std::pair<int64_t, int64_t>>{{60, 150}, {9, 600}, {36, 150}, {192, 150}, {36, 400}}
          : std::vector<std::pair<int64_t, int64_t>>{{96, 1000}, {32, 300}, {32, 3000}, {40, 1000}, {32, 300},
                                                     {256, 1000}, {32, 500}, {40, 3000}, {32, 300}};
  const int64_t skew = std::atoi(argv[2]), layers = std::atoi(argv[3]);
  cholla::Team team(2);
  std::vector<Clock::time_point> closed(layers);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      cholla::Member member(team, t);
      for (int64_t l = 0; l < layers; ++l)
        for (size_t s = 0; s < stages.size(); ++s) {
          const auto [n, ns] = stages[s];
          for (int64_t begin, end; member.next(n, begin, end);)
            for (int64_t j = begin; j < end; ++j) {
              const int64_t spin = ns * (80 + (j * 7919 + l * 104729) % 41) / 100 * (t == 1 ? skew : 100) / 100;
              for (const auto until = Clock::now() + std::chrono::nanoseconds(spin); Clock::now() < until;) {
              }
            }
          member.finish([&] { if (s + 1 == stages.size()) closed[l] = Clock::now(); });
        }
    });
  for (auto& thread : threads) thread.join();
  std::vector<double> times;
  for (int64_t l = 1; l < layers; ++l) times.push_back(std::chrono::duration<double, std::micro>(closed[l] - closed[l - 1]).count());
  std::sort(times.begin(), times.end());
  double work = 0;
  for (const auto [n, ns] : stages) work += n * ns / 1000.0 / (1.0 + 100.0 / skew);
  std::printf("%.2f %.2f\n", times[times.size() / 10], work);
}
"""


def build(checkout: Path, folder: Path, name: str) -> Path:
    source = folder / "driver.cpp"
    source.write_text(DRIVER)
    binary = folder / name
    subprocess.run(["g++", "-O2", "-std=c++17", "-pthread", f"-I{checkout / 'cholla' / 'kernels'}", str(source), "-o",
                    str(binary)], check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--shape", choices=("gemma3", "smollm2"), default="gemma3")
    parser.add_argument("--skew", type=float, nargs="+", default=[1.0, 1.1])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--layers", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"this": build(ROOT, Path(tmp), "this"), "baseline": build(args.baseline.resolve(), Path(tmp), "base")}
        print("| shape | member 1's jobs | even split, us | baseline p10, us | this p10, us | this / baseline |")
        print("|---|---:|---:|---:|---:|---:|")
        for skew in args.skew:
            best: dict[str, float] = {}
            for _ in range(args.runs):
                for name, binary in sides.items():
                    out = subprocess.run([str(binary), args.shape, str(round(skew * 100)), str(args.layers)],
                                         check=True, capture_output=True, text=True).stdout.split()
                    best[name], even = min(best.get(name, float("inf")), float(out[0])), float(out[1])
            print(f"| {args.shape} | x{skew:g} | {even:.1f} | {best['baseline']:.1f} | {best['this']:.1f} | "
                  f"{best['this'] / best['baseline']:.3f} |")


if __name__ == "__main__":
    main()
