"""``/metrics``: the engine's counters and latencies as Prometheus metrics, vLLM's names under ``cholla:``.

Gauges and counters are read from ``engine.stats()`` at scrape time. Latencies and
batch sizes sit in the engine's bounded deques; each scrape drains them into
histograms, so nothing is counted twice and nothing grows without bound. One
registry per app, so two apps in a process (tests) never share a metric.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cholla.serve.host import EngineHost

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _drain(values: deque, histogram: Histogram) -> None:
    # popleft is atomic, so the engine thread may append while we drain.
    while True:
        try:
            histogram.observe(values.popleft())
        except IndexError:
            return


class _EngineCollector(Collector):
    """Gauges and counters read from the engine when scraped."""

    def __init__(self, host: EngineHost, model_name: str):
        self.host, self.model_name = host, model_name

    def collect(self) -> Iterator[Metric]:
        engine = self.host.engine
        if engine is None:
            return
        stats, metrics = engine.engine.stats(), engine.engine.metrics
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("cholla:num_requests_running", "Sequences in the running batch.", stats.num_running)
        yield gauge("cholla:num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting)
        yield gauge("cholla:num_requests_admitted", "Sequences the server has admitted and not yet finished.",
                    self.host.num_in_flight)
        yield gauge("cholla:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", stats.kv_cache_usage)
        if stats.state_slots_total:  # a model with recurrent layers (kv/state_cache.py)
            yield gauge("cholla:state_slots_usage_perc", "Fraction of recurrent-state slots in use (1 = full).",
                        stats.state_slots_usage)
            yield counter("cholla:state_snapshots_restored", "Prefix-cache hits resumed from a state snapshot.",
                          stats.state_snapshots_restored)
        yield counter("cholla:prefix_cache_queries", "KV blocks looked up in the prefix cache.", stats.prefix_cache_queries)
        yield counter("cholla:prefix_cache_hits", "KV blocks found in the prefix cache.", stats.prefix_cache_hits)
        yield counter("cholla:kv_offload_blocks_read", "KV blocks read back from the disk tier (--kv-offload-dir).",
                      stats.kv_offload_blocks_read)
        yield counter("cholla:kv_offload_blocks_written", "KV blocks written to the disk tier.",
                      stats.kv_offload_blocks_written)
        yield counter("cholla:prompt_tokens", "Prompt tokens of requests that started.", stats.prompt_tokens)
        yield counter("cholla:generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield counter("cholla:num_preemptions", "Sequences preempted to free KV cache.", stats.preemptions)
        yield counter("cholla:spec_decode_num_drafts", "Speculative verifications (one per speculating sequence and step).",
                      stats.spec_verifications)
        yield counter("cholla:spec_decode_num_draft_tokens", "Draft tokens proposed.", stats.spec_draft_tokens)
        yield counter("cholla:spec_decode_num_accepted_tokens", "Draft tokens accepted.", stats.spec_accepted_tokens)
        yield gauge("cholla:spec_decode_mean_accepted_length",
                    "Tokens per verification step since start: accepted drafts plus the model's own (0: none yet).",
                    stats.spec_mean_accepted_length)
        finished = CounterMetricFamily("cholla:request_success", "Sequences finished, by reason.",
                                       labels=["model_name", "finished_reason"])
        for reason, count in sorted(metrics.finished_requests.items()):
            finished.add_metric([self.model_name, reason], count)
        yield finished


class ServerMetrics:
    def __init__(self, host: EngineHost, model_name: str):
        self.host = host
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(host, model_name))

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "cholla:time_to_first_token_seconds", "Time from arrival to the first token.", LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "cholla:inter_token_latency_seconds", "Time between two tokens of one sequence.", LATENCY_BUCKETS)
        self.end_to_end_latency = histogram(
            "cholla:e2e_request_latency_seconds", "Time from arrival to the end of a sequence.", LATENCY_BUCKETS)
        self.batch_size = histogram(
            "cholla:iteration_batch_size", "Sequences in each engine step's batch.", BATCH_BUCKETS)

    def render(self) -> bytes:
        """The Prometheus text exposition, after draining the engine's latency deques."""
        engine = self.host.engine
        if engine is not None:
            metrics = engine.engine.metrics
            _drain(metrics.time_to_first_token, self.time_to_first_token)
            _drain(metrics.inter_token_latency, self.inter_token_latency)
            _drain(metrics.end_to_end_latency, self.end_to_end_latency)
            _drain(metrics.batch_sizes, self.batch_size)
        return generate_latest(self.registry)
