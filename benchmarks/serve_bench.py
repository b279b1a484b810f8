"""Load-test any OpenAI-compatible server: N streaming requests, C at a time.

    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000/v1 --model smollm2 \\
        --num-requests 64 --concurrency 16 --prompt-len 64 --max-tokens 32 --ignore-eos

Each request streams ``/v1/completions`` (``--chat``: ``/v1/chat/completions``) and
asks for usage in the last chunk, so token counts are the server's own. Prints
requests/s, output and total tokens/s, and time-to-first-token and inter-token
latency percentiles (the gaps between content chunks of one stream), vLLM's
benchmark_serving figures. Needs only httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = ("desert river mountain city forest ocean valley island garden bridge library market castle harbor "
         "meadow canyon glacier village tower station").split()


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between content chunks


def make_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from a file (one per line, cycled), else synthetic ones of about --prompt-len words, all different."""
    if args.prompt_file:
        lines = [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        return [lines[i % len(lines)] for i in range(args.num_requests)]
    rng = random.Random(args.seed)
    return [f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(args.prompt_len)) for i in range(args.num_requests)]


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt: str) -> Result:
    body: dict = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.chat:
        path, body["messages"] = "/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/completions", prompt
    result = Result()
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", args.base_url.rstrip("/") + path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = str(data["error"])[:200]
                    return result
                if data.get("usage"):
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
                    result.output_tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                        chunks += 1
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = True
    return result


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    if len(values) == 1:
        return (values[0],) * 3
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


async def run(args: argparse.Namespace) -> list[Result]:
    prompts = make_prompts(args)
    limit = asyncio.Semaphore(args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:

        async def limited(prompt: str) -> Result:
            async with limit:
                return await one_request(client, args, prompt)

        return await asyncio.gather(*(limited(p) for p in prompts))


def report(args: argparse.Namespace, results: list[Result], duration: float) -> str:
    ok = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ttft = percentiles([r.ttft for r in ok if r.ttft is not None])
    itl = percentiles([gap for r in ok for gap in r.gaps])
    e2e = percentiles([r.latency for r in ok])
    rows = [
        ("requests (ok / errors)", f"{len(ok)} / {len(results) - len(ok)}"),
        ("concurrency", f"{args.concurrency}"),
        ("duration (s)", f"{duration:.2f}"),
        ("prompt / output tokens", f"{prompt_tokens} / {output_tokens}"),
        ("requests/s", f"{len(ok) / duration:.3f}"),
        ("output tokens/s", f"{output_tokens / duration:.2f}"),
        ("total tokens/s", f"{(prompt_tokens + output_tokens) / duration:.2f}"),
        ("TTFT p50 / p90 / p99 (ms)", " / ".join(f"{v * 1000:.0f}" for v in ttft)),
        ("ITL p50 / p90 / p99 (ms)", " / ".join(f"{v * 1000:.0f}" for v in itl)),
        ("E2E latency p50 / p90 / p99 (s)", " / ".join(f"{v:.2f}" for v in e2e)),
    ]
    lines = ["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    errors = sorted({r.error for r in results if not r.ok})
    lines += [f"error: {e}" for e in errors[:5]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API root, ending in /v1")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--prompt-len", type=int, default=64, help="words per synthetic prompt")
    parser.add_argument("--prompt-file", default=None, help="prompts, one per line, instead of synthetic ones")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="make every request generate --max-tokens (vLLM's field)")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = asyncio.run(run(args))
    print(report(args, results, time.perf_counter() - start))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
