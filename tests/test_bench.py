"""``cholla bench`` runs end to end on the small model and prints llama-bench's table."""

from __future__ import annotations

import re

import pytest

from cholla.bench import BenchReport, BenchTest, SpeculativeStats, format_table
from cholla.cli import main


def test_format_table_mean_and_sample_sd():
    report = BenchReport("m.gguf", 3 * 2**20, "bfloat16", 2, [BenchTest("pp512", [10.0, 12.0, 14.0])], 500 * 2**20)
    table = format_table(report)
    assert "| m.gguf | 3.00 MiB | bfloat16 | 2 | pp512 | 12.00 ± 2.00 |" in table
    assert table.splitlines()[-1] == "peak RSS: 500 MiB"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_cli_prints_the_table(smollm2_path, capsys, dtype):
    assert main(["bench", str(smollm2_path), "-p", "8", "-n", "2", "-r", "2", "--threads", "1", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | size | dtype | threads | test | t/s |")
    rows = re.findall(rf"\| SmolLM2-135M-Instruct\.Q4_1\.gguf \| [\d.]+ MiB \| {dtype} \| 1 \| (\w+) \| [\d.]+ ± [\d.]+ \|", out)
    assert rows == ["pp8", "tg2"]
    assert re.search(r"peak RSS: \d+ MiB", out)


def test_bench_reports_speculation(smollm2_path, capsys, monkeypatch):
    import json

    from cholla.speculative import speculator

    # Short matches wait for a record of accepted drafts (a speed policy); this test wants drafts to report.
    monkeypatch.setattr(speculator, "SHORT_MATCH", 0)
    assert main(["bench", str(smollm2_path), "-p", "0", "-n", "24", "-r", "1", "--threads", "1",
                 "--speculative-method", "ngram", "--num-speculative-tokens", "3", "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)["speculative"]
    assert spec["method"] == "ngram" and spec["num_speculative_tokens"] == 3 and spec["verifications"] > 0
    assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"] <= 3 * spec["verifications"]
    assert spec["mean_accepted_length"] == 1 + spec["accepted_tokens"] / spec["verifications"]
    report = BenchReport("m.gguf", 2**20, "float32", 1, [BenchTest("tg8", [5.0])], 2**20,
                         speculative=SpeculativeStats("ngram", 4, verifications=4, draft_tokens=12, accepted_tokens=9))
    assert ("speculative (ngram, K=4) over the tg runs: 12 drafts proposed, 9 accepted (75%), "
            "3.25 tokens per verification step (4 steps)") in format_table(report)


def test_bench_rejects_nothing_to_measure(smollm2_path, capsys):
    assert main(["bench", str(smollm2_path), "-p", "0", "-n", "0"]) == 2
    assert "bench needs" in capsys.readouterr().err


def test_bench_profile_names_our_kernels(smollm2_path, capsys):
    from cholla.kernels import cpu_kernels

    assert main(["bench", str(smollm2_path), "-p", "16", "-n", "4", "-r", "1", "--threads", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "pp16, ops by self time" in out and "tg4, ops by self time" in out
    if cpu_kernels() is not None:
        assert "cholla::qgemv" in out
