"""Load-test any OpenAI-compatible server: N streaming requests, C at a time.

    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000/v1 --model smollm2 \\
        --num-requests 64 --concurrency 16 --prompt-len 64 --max-tokens 32 --ignore-eos

Each request streams ``/v1/completions`` (``--chat``: ``/v1/chat/completions``) and
asks for usage in the last chunk, so token counts are the server's own. Prints
requests/s, output and total tokens/s, and time-to-first-token and inter-token
latency percentiles (the gaps between content chunks of one stream), vLLM's
benchmark_serving figures. Needs only httpx.

As a soak: ``--hang-up F`` makes a seeded fraction of the clients close their
stream after the first token, ``--bad F`` sends a fraction of malformed bodies
(non-finite numbers, lone surrogates, deep nesting, too many stop strings,
text/plain), and ``--check-leaks`` then waits for cholla's
``cholla:kv_cache_usage_perc`` to come back to 0. The table counts the answers
by status: a server that holds up shows no 5xx and no KV cache left in use.
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


# Malformed bodies for --bad (raw text: Python's json would not write most of them); each must get a 4xx.
BAD_BODIES = [
    ('{"model": "%s", "prompt": "Hi", "max_tokens": 4, "temperature": NaN}', "application/json"),
    ('{"model": "%s", "prompt": "Hi", "max_tokens": 4, "logit_bias": {"5": 1e309}}', "application/json"),
    ('{"model": "%s", "prompt": "\\ud800 Hi", "max_tokens": 4}', "application/json"),
    ('{"model": "%s", "prompt": "Hi", "max_tokens": 4, "metadata": ' + "[" * 5000 + "]" * 5000 + "}", "application/json"),
    ('{"model": "%s", "prompt": "Hi", "max_tokens": 4, "stop": [' + ", ".join(['"x"'] * 1000) + "]}", "application/json"),
    ('{"model": "%s", "prompt": "Hi", "max_tokens": 4}', "text/plain"),
]


@dataclass
class Result:
    ok: bool = False
    status: int = 0  # HTTP status; 0 if none came
    hung_up: bool = False  # closed by us after the first token (--hang-up)
    bad: bool = False  # a malformed body (--bad): ok means it got a 4xx
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


async def bad_request(client: httpx.AsyncClient, args: argparse.Namespace, index: int) -> Result:
    template, content_type = BAD_BODIES[index % len(BAD_BODIES)]
    result = Result(bad=True)
    try:
        response = await client.post(args.base_url.rstrip("/") + "/completions", content=(template % args.model).encode(),
                                     headers={"content-type": content_type})
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.status = response.status_code
    result.ok = 400 <= response.status_code < 500
    if not result.ok:
        result.error = f"malformed body got HTTP {response.status_code}: {response.text[:200]!r}"
    return result


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt: str, hang_up: bool = False) -> Result:
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
            result.status = response.status_code
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
                        if hang_up:  # leave mid-stream; the server must abort and free the request's blocks
                            result.hung_up = result.ok = True
                            return result
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
    rng = random.Random(args.seed + 1)
    kinds = [("bad" if roll < args.bad else "hang" if roll < args.bad + args.hang_up else "full")
             for roll in (rng.random() for _ in prompts)]
    limit = asyncio.Semaphore(args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:

        async def limited(index: int, prompt: str) -> Result:
            async with limit:
                if kinds[index] == "bad":
                    return await bad_request(client, args, index)
                return await one_request(client, args, prompt, hang_up=kinds[index] == "hang")

        return await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))


async def kv_cache_usage_after(args: argparse.Namespace, wait_s: float = 20.0) -> float | None:
    """cholla's ``kv_cache_usage_perc`` once it reaches 0 (aborts land asynchronously), or its last value."""
    root = args.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    value = None
    deadline = time.perf_counter() + wait_s
    async with httpx.AsyncClient(headers=headers) as client:
        while time.perf_counter() < deadline:
            for line in (await client.get(root + "/metrics")).text.splitlines():
                if line.startswith("cholla:kv_cache_usage_perc"):
                    value = float(line.rsplit(" ", 1)[1])
            if value == 0.0 or value is None:
                return value
            await asyncio.sleep(0.2)
    return value


def report(args: argparse.Namespace, results: list[Result], duration: float, kv_usage: float | None = None) -> str:
    ok = [r for r in results if r.ok and not r.hung_up and not r.bad]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ttft = percentiles([r.ttft for r in ok if r.ttft is not None])
    itl = percentiles([gap for r in ok for gap in r.gaps])
    e2e = percentiles([r.latency for r in ok])
    rows = [
        ("requests (ok / errors)", f"{len(ok)} / {sum(not r.ok for r in results)}"),
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
    if args.hang_up or args.bad or args.check_leaks:
        statuses = sorted({r.status for r in results})
        rows += [
            ("hung up after the first token", f"{sum(r.hung_up for r in results)}"),
            ("malformed bodies (got 4xx / sent)", f"{sum(r.bad and r.ok for r in results)} / {sum(r.bad for r in results)}"),
            ("answers by HTTP status", ", ".join(f"{s or 'none'}: {sum(r.status == s for r in results)}" for s in statuses)),
            ("5xx answers", f"{sum(r.status >= 500 for r in results)}"),
        ]
        if args.check_leaks:
            rows.append(("KV cache in use afterwards", "n/a (no cholla metric)" if kv_usage is None else f"{kv_usage:.4f}"))
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
    parser.add_argument("--hang-up", type=float, default=0.0, metavar="F",
                        help="fraction of clients that close their stream after the first token (soak)")
    parser.add_argument("--bad", type=float, default=0.0, metavar="F", help="fraction of malformed bodies (soak); each must get a 4xx")
    parser.add_argument("--check-leaks", action="store_true",
                        help="afterwards, wait for cholla's KV cache usage to return to 0 and report it")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = asyncio.run(run(args))
    duration = time.perf_counter() - start
    kv_usage = asyncio.run(kv_cache_usage_after(args)) if args.check_leaks else None
    print(report(args, results, duration, kv_usage))
    leaked = args.check_leaks and kv_usage not in (None, 0.0)
    return 0 if all(r.ok for r in results) and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
