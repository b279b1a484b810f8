"""What the engine counts while it runs: load, KV usage, prefix-cache hits, latencies.

The engine only records; the server turns a snapshot into Prometheus metrics,
and the CLI and benchmarks print it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EngineMetrics:
    prompt_tokens: int = 0  # prompt tokens of requests that started
    generation_tokens: int = 0
    finished_requests: dict[str, int] = field(default_factory=dict)  # by finish reason
    preemptions: int = 0
    steps: int = 0
    # Speculative decoding: verification steps (one per speculating sequence), drafts, accepted drafts.
    spec_verifications: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # Recent latencies in seconds, drained by whoever reports them (bounded, so nobody leaks).
    time_to_first_token: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    inter_token_latency: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    end_to_end_latency: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))

    def on_token(self, arrival: float, previous: float | None, now: float) -> None:
        self.generation_tokens += 1
        if previous is None:
            self.time_to_first_token.append(now - arrival)
        else:
            self.inter_token_latency.append(now - previous)

    def on_verification(self, num_drafts: int, num_accepted: int) -> None:
        self.spec_verifications += 1
        self.spec_draft_tokens += num_drafts
        self.spec_accepted_tokens += num_accepted

    def on_finish(self, reason: str, arrival: float, now: float) -> None:
        self.finished_requests[reason] = self.finished_requests.get(reason, 0) + 1
        self.end_to_end_latency.append(now - arrival)


@dataclass
class EngineStats:
    """A point-in-time view of the engine, for /metrics and logs."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    spec_verifications: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    state_slots_total: int = 0  # models with recurrent layers (kv/state_cache.py)
    state_slots_free: int = 0
    state_snapshots_restored: int = 0  # prefix-cache hits that resumed a sequence's state from a snapshot
    kv_offload_blocks_read: int = 0  # the KV disk tier (kv/disk_tier.py): blocks read back instead of recomputed
    kv_offload_blocks_written: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted drafts over proposed drafts."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verification step yields on average: the accepted drafts plus the model's own token."""
        return 1 + self.spec_accepted_tokens / self.spec_verifications if self.spec_verifications else 0.0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def state_slots_usage(self) -> float:
        return 1.0 - self.state_slots_free / self.state_slots_total if self.state_slots_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
