// How a team of threads shares a decode step (decode_layers.cpp) and each
// product's jobs (ops.h): stages of jobs, handed out in chunks.
//
// A stage is a list of jobs that write disjoint outputs (a product's groups of
// weight rows, the attention's query heads), and may end with a small serial
// step that the next stage reads (rope and the cache writes after q/k/v, the
// residual add and the next norm after a projection). Each member's own part
// of a stage is the range a static split gives it (share()), cut into chunks
// (CHUNKS_PER_MEMBER, CHUNK_MAX_JOBS; the last in halves: OwnChunks) that it claims in
// order; a member with none of its own left claims the others' next ones. On a quiet machine each member so
// walks its own range, as under the static split; on a busy one, a member the
// OS has descheduled holds the others up for at most the chunk in its hands,
// and the rest of its part is done by whoever runs. (With a static split and
// a barrier per stage, SmolLM2 kept 24% of its quiet decode speed at two
// threads beside one busy loop on a 2-core machine: docs/benchmarks.md.)
//
// A stage ends when its last chunk is done, not when every member has
// arrived: the member that reports the last chunk runs the serial step and
// opens the next stage; the others wait for that, spinning for at most
// SPIN_MICROSECONDS (a stage's waits on a quiet machine are a fraction of a
// microsecond to a few), then sleeping on a futex over the stage number. A
// member that was away finds the stages it missed closed and catches up
// without waiting. A failing member wakes everyone (fail()), so an error in
// one thread cannot leave the others waiting forever.
//
// Every member runs the same stages in the same order, asking next() with the
// stage's job count until it says no, then calling finish(). Which member
// computes a job never changes what the job computes.
//
// Linux only (futex(2)); depends on nothing of torch, so that
// tests/test_team.py builds it alone.

#pragma once

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <utility>

namespace cholla {

// How long a waiter spins before it sleeps. Quiet, a stage's waits are far
// shorter; under contention a wait can last a time slice, and each costs at
// most this much of someone else's CPU (measured in docs/benchmarks.md).
constexpr int64_t SPIN_MICROSECONDS = 30;

// A member's own part is cut into at least CHUNKS_PER_MEMBER chunks, and into
// chunks of at most CHUNK_MAX_JOBS jobs: small enough that a descheduled
// member leaves little undone in its hands (a chunk of Gemma 3's 178 MB head
// cut in 8 took ~0.3 ms on one core; 64 jobs of 16 rows take ~15-60 us), few
// enough that claiming (an uncontended compare-and-swap each) stays negligible
// next to a chunk's work.
constexpr int64_t CHUNKS_PER_MEMBER = 8;
constexpr int64_t CHUNK_MAX_JOBS = 64;

// Member `member` of `members`: its own range [begin, end) of n jobs (as at::parallel_for cuts them).
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t member, int64_t members) {
  const int64_t chunk = (n + members - 1) / members;
  return {std::min(n, member * chunk), std::min(n, (member + 1) * chunk)};
}

// A member's own part of a stage of n jobs: `even` chunks of about equal size, the last of
// them cut in halves (L jobs: L - L/2, then half of what is left, ..., one job: bit_width(L)
// pieces). A stage ends when its last chunk does; the member that runs out first takes the
// others' next chunks, in order, so at the end both work on pieces that shrink, and the one
// that finds nothing left waits for about half a piece of a job or two, not half a chunk
// (Gemma 3's 32-row step: 2-16 jobs a chunk, nine stages a layer).
// A stage of no jobs has one empty chunk, member 0's, so that someone still closes it.
struct OwnChunks {
  int64_t begin, size, even, tail, count;

  OwnChunks(int64_t n, int64_t member, int64_t members) {
    const auto [first, last] = share(n, member, members);
    begin = first, size = last - first;
    even = size == 0 ? (n == 0 && member == 0 ? 1 : 0)
                     : std::min(size, std::max(CHUNKS_PER_MEMBER, (size + CHUNK_MAX_JOBS - 1) / CHUNK_MAX_JOBS));
    tail = even == 0 ? 0 : size - size * (even - 1) / even;  // the last even chunk's jobs
    count = even == 0 ? 0 : even - 1 + (tail == 0 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(tail)));
  }
  // Chunk i's jobs [begin, end).
  std::pair<int64_t, int64_t> chunk(int64_t i) const {
    if (i < even - 1) return {begin + size * i / even, begin + size * (i + 1) / even};
    const int64_t piece = i - (even - 1), end = begin + size;  // tail >> piece jobs are left before it
    return {end - (tail >> piece), end - (tail >> (piece + 1))};
  }
};

// All members' chunks of a stage of n jobs.
inline int64_t stage_chunks(int64_t n, int64_t members) {
  int64_t total = 0;
  for (int64_t m = 0; m < members; ++m) total += OwnChunks(n, m, members).count;
  return total;
}

// What the members share; each thread works through a Member of it.
class Team {
 public:
  explicit Team(int64_t members, int64_t spin_microseconds = SPIN_MICROSECONDS)
      : members_(members), spin_(spin_microseconds), claims_(new Claims[members]) {}

  int64_t members() const { return members_; }

  // Lets every member go, now and at every later wait; next() and finish() then return false.
  void fail() {
    failed_.store(true, std::memory_order_seq_cst);
    stage_.fetch_add(1, std::memory_order_seq_cst);  // (a waiter about to sleep then finds the word changed)
    wake();
  }

  bool failed() const { return failed_.load(std::memory_order_acquire); }

  // How many times a waiter went to sleep (for tests and measurements).
  int64_t sleeps() const { return sleeps_.load(std::memory_order_relaxed); }

 private:
  friend class Member;

  // Member m's claims in the open stage: the stage's number (high half) and how many of its own chunks are taken.
  struct alignas(64) Claims {
    std::atomic<uint64_t> word{0};
  };

  static uint64_t claims_word(uint32_t stage, uint64_t taken) { return (static_cast<uint64_t>(stage) << 32) | taken; }

  // The serial step is done: stage `next` is open.
  void open(uint32_t next) {
    done_.store(0, std::memory_order_relaxed);
    for (int64_t m = 0; m < members_; ++m) claims_[m].word.store(claims_word(next, 0), std::memory_order_relaxed);
    stage_.store(next, std::memory_order_seq_cst);  // publishes the above and the serial step's writes
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake();
  }

  bool passed(uint32_t stage) const {
    return stage_.load(std::memory_order_acquire) != stage || failed_.load(std::memory_order_acquire);
  }

  // Until stage `stage` has closed: a bounded spin, then a sleep.
  void wait(uint32_t stage) {
    const auto deadline = std::chrono::steady_clock::now() + spin_;
    for (int64_t i = 1;; ++i) {
      if (passed(stage)) return;
      _mm_pause();
      // The clock costs ~20 ns (vDSO), a pause 10-50 ns: look at it now and then.
      if (i % 32 == 0 && std::chrono::steady_clock::now() >= deadline) break;
    }
    sleeps_.fetch_add(1, std::memory_order_relaxed);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    // FUTEX_WAIT returns at once when the word no longer holds `stage`, so an
    // opening between the check and the call is never missed. (seq_cst on both
    // sides: either open() sees this sleeper, or its FUTEX_WAIT sees the new stage.)
    while (!passed(stage))
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&stage_), FUTEX_WAIT_PRIVATE, stage, nullptr, nullptr, 0);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

  void wake() {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&stage_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
  }

  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex needs a plain 32-bit word");

  const int64_t members_;
  const std::chrono::microseconds spin_;
  const std::unique_ptr<Claims[]> claims_;
  alignas(64) std::atomic<int64_t> done_{0};  // chunks of the open stage reported done
  alignas(64) std::atomic<uint32_t> stage_{0};  // the open stage
  std::atomic<int32_t> sleepers_{0};
  std::atomic<bool> failed_{false};
  std::atomic<int64_t> sleeps_{0};
};

// One thread's side of a Team: where it is in the stages, and what it holds.
class Member {
 public:
  Member(Team& team, int64_t index) : team_(team), index_(index) {}

  int64_t index() const { return index_; }
  int64_t members() const { return team_.members_; }

  // The next jobs [begin, end) of the open stage's n for this member: its own
  // chunks first, in order, then the others'. Asking again means the last ones
  // are done. False: none left, or the team failed.
  bool next(int64_t n, int64_t& begin, int64_t& end) {
    if (holding_) holding_ = false, ++unreported_;
    if (team_.failed()) return false;
    if (n != n_) n_ = n, own_ = OwnChunks(n, index_, team_.members_), total_ = stage_chunks(n, team_.members_);
    for (int64_t i = 0; i < team_.members_; ++i) {
      const int64_t owner = (index_ + i) % team_.members_;
      const OwnChunks own = i == 0 ? own_ : OwnChunks(n, owner, team_.members_);
      std::atomic<uint64_t>& word = team_.claims_[owner].word;
      uint64_t seen = word.load(std::memory_order_acquire);
      // (a word of another stage: this member is behind, and the stage it asks about has closed)
      while (seen >> 32 == stage_ && static_cast<int64_t>(seen & 0xffffffffu) < own.count) {
        if (word.compare_exchange_weak(seen, seen + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
          std::tie(begin, end) = own.chunk(static_cast<int64_t>(seen & 0xffffffffu));
          holding_ = true;
          return true;
        }
      }
    }
    report();
    return false;
  }

  // True when the stage this member is at has already closed (it was away): nothing of it is left to do.
  bool behind() const { return team_.stage_.load(std::memory_order_acquire) != stage_; }

  // Ends this member's part in the stage. The member that reports the stage's
  // last chunk runs `last` (the serial step: it sees every chunk's writes),
  // then opens the next stage; the others wait for that. False: the team
  // failed, stop.
  template <typename Last>
  bool finish(Last&& last) {
    if (holding_) holding_ = false, ++unreported_;
    report();
    if (closing_) {
      closing_ = false;
      if (!team_.failed()) {
        last();
        team_.open(stage_ + 1);
      }
    } else {
      team_.wait(stage_);
    }
    ++stage_;
    return !team_.failed();
  }
  bool finish() {
    return finish([] {});
  }

 private:
  // The chunks done are counted once the member has no more (one atomic
  // addition on the line every member shares, not one a chunk); the member
  // whose count completes the stage's closes it.
  void report() {
    if (unreported_ == 0) return;
    if (team_.done_.fetch_add(unreported_, std::memory_order_acq_rel) + unreported_ == total_) closing_ = true;
    unreported_ = 0;
  }

  Team& team_;
  const int64_t index_;
  uint32_t stage_ = 0;  // the stage this member is in
  // The last job count asked about, this member's chunks of it and all members' (a claim
  // recomputed them: ~50 ns, which SmolLM2's one-row stages of ~1 us chunks felt)
  int64_t n_ = 0;
  OwnChunks own_{0, index_, team_.members_};
  int64_t total_ = stage_chunks(0, team_.members_);
  int64_t unreported_ = 0;  // chunks done but not yet counted
  bool holding_ = false, closing_ = false;
};

}  // namespace cholla
