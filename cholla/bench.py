"""``cholla bench``: prompt processing and generation speed in llama-bench's terms.

``pp512`` prefills a 512-token random prompt in one step and reports prompt
tokens per second; ``tg128`` decodes 128 tokens for a single sequence and
reports generated tokens per second. Each test runs ``repetitions`` times
(after one short warm-up), reported as mean ± sample standard deviation, so
the figures compare with llama.cpp's.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.errors import InvalidRequestError
from cholla.sampling.params import SamplingParams
from cholla.speculative.config import DEFAULT_TREE_BUDGET

# Enough KV cache for a few thousand tokens of either real model; pages are only
# resident once written, so a larger budget would not show in the peak RSS anyway.
BENCH_KV_CACHE_MEMORY = 256 * 2**20
PROFILE_ROWS = 15


@dataclass
class BenchTest:
    name: str  # "pp512", "tg128"
    tokens_per_s: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tokens_per_s)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.tokens_per_s) if len(self.tokens_per_s) > 1 else 0.0


@dataclass
class BenchReport:
    model: str
    size_bytes: int
    dtype: str
    threads: int
    tests: list[BenchTest] = field(default_factory=list)
    peak_rss_bytes: int = 0
    profile: str = ""  # with --profile: where each test's time goes, op by op
    speculative: SpeculativeStats | None = None  # with a speculative method: its counts over the tg runs


@dataclass
class SpeculativeStats:
    method: str
    num_speculative_tokens: int
    verifications: int  # steps in which a sequence verified drafts
    draft_tokens: int
    accepted_tokens: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step: the accepted drafts and the model's own token."""
        return 1 + self.accepted_tokens / self.verifications if self.verifications else 0.0


def _random_prompt(length: int, vocab_size: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def time_prefill(engine: LLMEngine, prompt: list[int]) -> float:
    """Prompt tokens per second for one prompt prefilled in one step (and its first token sampled)."""
    engine.add_request(None, {"prompt_token_ids": prompt}, _greedy(1))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompt) / (time.perf_counter() - start)


def time_decode(engine: LLMEngine, first_token: int, num_tokens: int) -> float:
    """Tokens per second over ``num_tokens`` single-sequence decode steps after a one-token prompt."""
    engine.add_request(None, {"prompt_token_ids": [first_token]}, _greedy(num_tokens + 1))
    engine.step()  # the one-token prompt: not a decode step
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return num_tokens / (time.perf_counter() - start)


def _rows_drafted(method: str | None, num_speculative_tokens: int, tree_budget: int) -> int:
    """The most drafted rows one speculating step adds."""
    return {None: 0, "tree": tree_budget}.get(method, num_speculative_tokens)


def run_bench(
    model_path: str | Path,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    dtype: str = "auto",
    threads: int | None = None,
    seed: int = 0,
    profile: bool = False,
    kv_cache_dtype: str = "auto",
    speculative_method: str | None = None,
    num_speculative_tokens: int = 4,
    speculative_ngram_cache_size: int = 0,
    draft_model: str | Path | None = None,
    spec_tree_budget: int = DEFAULT_TREE_BUDGET,
    spec_skip_layers: str | None = None,
) -> BenchReport:
    """Load the model once and run pp{n_prompt} then tg{n_gen}; a count of 0 skips that test.

    ``speculative_method``: decode with speculation (as ``EngineConfig``), reporting its counts
    over the tg runs. The shared n-gram cache is off by default here: the tg runs would draft
    each other's text.

    ``profile``: run each test once more under ``torch.profiler`` and keep the
    ops that took the most time (our kernels appear as ``cholla::...``).
    """
    if repetitions < 1 or n_prompt < 0 or n_gen < 0 or not (n_prompt or n_gen):
        raise InvalidRequestError("bench needs --repetitions >= 1 and a positive -p or -n")
    path = Path(model_path)
    config = EngineConfig(
        max_model_len=max(n_prompt, n_gen + 1) + 1,
        max_num_batched_tokens=max(n_prompt, 1 + _rows_drafted(speculative_method, num_speculative_tokens, spec_tree_budget)),
        kv_cache_memory=BENCH_KV_CACHE_MEMORY,
        enable_prefix_caching=False,
        dtype=dtype,
        threads=threads,
        kv_cache_dtype=kv_cache_dtype,
        speculative_method=speculative_method,
        num_speculative_tokens=num_speculative_tokens,
        speculative_ngram_cache_size=speculative_ngram_cache_size,
        draft_model=draft_model,
        spec_tree_budget=spec_tree_budget,
        spec_skip_layers=spec_skip_layers,
    )
    engine = LLMEngine(path, config)
    vocab_size = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    report = BenchReport(path.name, path.stat().st_size if path.is_file() else _folder_size(path),
                         engine.loaded.dtype, torch.get_num_threads())

    time_prefill(engine, _random_prompt(min(n_prompt, 16) or 1, vocab_size, generator))  # warm-up
    time_decode(engine, 0, 2)
    if n_prompt:
        rates = [time_prefill(engine, _random_prompt(n_prompt, vocab_size, generator)) for _ in range(repetitions)]
        report.tests.append(BenchTest(f"pp{n_prompt}", rates))
    if n_gen:
        before = engine.stats()
        rates = [time_decode(engine, _random_prompt(1, vocab_size, generator)[0], n_gen) for _ in range(repetitions)]
        report.tests.append(BenchTest(f"tg{n_gen}", rates))
        after = engine.stats()
        if speculative_method:
            report.speculative = SpeculativeStats(
                speculative_method, num_speculative_tokens, after.spec_verifications - before.spec_verifications,
                after.spec_draft_tokens - before.spec_draft_tokens, after.spec_accepted_tokens - before.spec_accepted_tokens)
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if profile:
        runs = [(f"pp{n_prompt}", lambda: time_prefill(engine, _random_prompt(n_prompt, vocab_size, generator)))] if n_prompt else []
        runs += [(f"tg{n_gen}", lambda: time_decode(engine, 0, n_gen))] if n_gen else []
        report.profile = "\n\n".join(_profile(name, run) for name, run in runs)
    return report


def _profile(name: str, run) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)
    return f"{name}, ops by self time (torch.profiler; wall time includes Python between ops):\n{table}"


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def report_dict(report: BenchReport) -> dict:
    """The report as plain data (``cholla bench --json``), for scripts such as benchmarks/compare.py."""
    return {
        "model": report.model,
        "size_bytes": report.size_bytes,
        "dtype": report.dtype,
        "threads": report.threads,
        "tests": [{"name": t.name, "tokens_per_s": t.tokens_per_s, "mean": t.mean, "sd": t.sd} for t in report.tests],
        "peak_rss_bytes": report.peak_rss_bytes,
        "speculative": None if report.speculative is None else {
            **asdict(report.speculative), "acceptance_rate": report.speculative.acceptance_rate,
            "mean_accepted_length": report.speculative.mean_accepted_length},
    }


def format_table(report: BenchReport) -> str:
    """A markdown table in llama-bench's layout, then the peak RSS."""
    size = f"{report.size_bytes / 2**20:.2f} MiB"
    lines = ["| model | size | dtype | threads | test | t/s |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for test in report.tests:
        lines.append(
            f"| {report.model} | {size} | {report.dtype} | {report.threads} | {test.name} "
            f"| {test.mean:.2f} ± {test.sd:.2f} |"
        )
    lines.append("")
    spec = report.speculative
    if spec is not None:
        lines.append(f"speculative ({spec.method}, K={spec.num_speculative_tokens}) over the tg runs: "
                     f"{spec.draft_tokens} drafts proposed, {spec.accepted_tokens} accepted ({spec.acceptance_rate:.0%}), "
                     f"{spec.mean_accepted_length:.2f} tokens per verification step ({spec.verifications} steps)")
    lines.append(f"peak RSS: {report.peak_rss_bytes / 2**20:.0f} MiB")
    if report.profile:
        lines += ["", report.profile]
    return "\n".join(lines)
