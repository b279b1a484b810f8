// The decode team's meeting point between stages (decode_layers.cpp).
//
// A member's wait at a stage's end is normally a fraction of a microsecond to
// a few microseconds (the members' shares differ slightly), far less than a
// sleep and a wake-up cost, so it spins first. But on a busy machine a member
// can be descheduled for a whole time slice (milliseconds); a waiter that
// spins through it burns the very CPU time the late member needs, and the step
// crawled at a tenth of its speed (docs/benchmarks.md, contention). So the
// spin is bounded in time, SPIN_MICROSECONDS, and then the waiter sleeps on a
// futex over the generation word until the last member to arrive wakes
// everyone. A failed member wakes everyone too (`fail()`), so an error in one
// thread cannot leave the others waiting forever.
//
// Linux only (futex(2)); depends on nothing of torch, so that
// tests/test_barrier.py builds it alone.

#pragma once

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>

namespace cholla {

// How long a waiter spins before it sleeps. Quiet, a stage's waits are far
// shorter; under contention most waits are a time slice, and each costs at
// most this much of someone else's CPU (measured in docs/benchmarks.md).
constexpr int64_t SPIN_MICROSECONDS = 30;

class Barrier {
 public:
  explicit Barrier(int64_t threads, int64_t spin_microseconds = SPIN_MICROSECONDS)
      : threads_(threads), spin_(spin_microseconds) {}

  // Waits for every member; false once the team has failed: stop.
  bool wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (failed_.load(std::memory_order_acquire)) return false;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      release();
    } else {
      if (!spin(generation)) sleep(generation);
    }
    return !failed_.load(std::memory_order_acquire);
  }

  // Lets every member go, now and at every later wait, which returns false.
  void fail() {
    failed_.store(true, std::memory_order_seq_cst);
    release();
  }

  // How many times a waiter went to sleep (for tests and measurements).
  int64_t sleeps() const { return sleeps_.load(std::memory_order_relaxed); }

 private:
  bool passed(uint32_t generation) const {
    return generation_.load(std::memory_order_acquire) != generation || failed_.load(std::memory_order_acquire);
  }

  // True once the barrier opened within the spin budget.
  bool spin(uint32_t generation) const {
    const auto deadline = std::chrono::steady_clock::now() + spin_;
    for (int64_t i = 1;; ++i) {
      if (passed(generation)) return true;
      _mm_pause();
      // The clock costs ~20 ns (vDSO), a pause 10-50 ns: look at it now and then.
      if (i % 32 == 0 && std::chrono::steady_clock::now() >= deadline) return false;
    }
  }

  void sleep(uint32_t generation) {
    sleeps_.fetch_add(1, std::memory_order_relaxed);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    // FUTEX_WAIT returns at once when the word no longer holds `generation`,
    // so a release between the check and the call is never missed.
    while (!passed(generation))
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation_), FUTEX_WAIT_PRIVATE, generation, nullptr,
              nullptr, 0);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

  // A new generation; the system call only when someone sleeps. (seq_cst on
  // both sides: either the sleeper's count is seen here, or its FUTEX_WAIT
  // sees the new generation.)
  void release() {
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
  }

  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex needs a plain 32-bit word");

  const int64_t threads_;
  const std::chrono::microseconds spin_;
  std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
  std::atomic<int32_t> sleepers_{0};
  std::atomic<bool> failed_{false};
  std::atomic<int64_t> sleeps_{0};
};

}  // namespace cholla
