"""Hostile and careless requests: every one gets a 2xx or a 4xx in its API's JSON shape, never a 5xx.

The request limits (``serve/limits.py``), the content-type and size checks of
``read_json``, the value checks of ``SamplingParams``, a large body that must
not stall ``/health``, and a seeded fuzz of OpenAI and Anthropic bodies against
one live server on the real default model, whose KV blocks must all be free at
the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import httpx
import pytest

from cholla.engine.engine import EngineConfig
from cholla.serve.limits import RequestLimits, nesting_depth, parse_body
from cholla.serve.errors import APIError
from tests.test_serve import MODEL, _wait_idle, serving

MAX_MODEL_LEN = 256
LIMITS = RequestLimits(max_body_bytes=2 * 2**20)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "The sky is", "max_tokens": 3, "temperature": 0}
MESSAGES = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3}
RESPONSES = {"model": MODEL, "input": [{"role": "user", "content": "Name a colour."}], "max_output_tokens": 3}
ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/messages": MESSAGES, "/v1/responses": RESPONSES}


@pytest.fixture(scope="module")
def live(smollm2_path):
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=16, kv_cache_memory=64 * 2**20, dtype="float32")
    with serving(smollm2_path, config, max_queue=64, limits=LIMITS) as server:
        yield server


def post(live, path: str, body: bytes | dict, content_type: str = "application/json", **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{live.url}{path}", content=content, headers={"content-type": content_type}, timeout=60, **kwargs)


def assert_error(response: httpx.Response, path: str, status: int, needle: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and needle in body["error"]["message"], body
    else:
        assert needle in body["error"]["message"], body


def test_parse_body_refuses_what_json_accepts():
    limits = RequestLimits(max_json_depth=8)
    cases = [
        (b'{"temperature": NaN}', "'temperature' is not a finite number"),
        (b'{"temperature": -Infinity}', "'temperature' is not a finite number"),
        (b'{"logit_bias": {"5": 1e309}}', "'logit_bias.5' is not a finite number"),
        (b'{"messages": [{"content": "a\\ud800b"}]}', "'messages.0.content' holds a lone UTF-16 surrogate"),
        (b'{"\\udfff": 1}', "a key in"),
        (b'{"a": ' + b"[" * 8 + b"]" * 8 + b"}", "nests 9 levels deep"),
        (b"[" * 100_000, "nests 100000 levels deep"),
        (b'{"n": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b"[1]", "must be a JSON object"),
    ]
    for body, needle in cases:
        with pytest.raises(APIError, match=needle.replace("(", r"\(")) as info:
            parse_body(body, limits)
        assert info.value.status == 400
    # Brackets inside strings do not count; a surrogate pair is one valid character.
    assert nesting_depth(b'{"a": "[[[[[[[[[[[[", "b": [[1]]}', 0) == 3
    assert parse_body(b'{"a": "[[[[[[[[[[[[[", "e": "\\ud83d\\ude00"}', limits) == {"a": "[" * 13, "e": "\U0001F600"}


def test_values_and_counts_are_400_naming_the_field(live):
    raw_nan = json.dumps(CHAT)[:-1].encode() + b', "top_p": NaN}'
    cases = [
        ("/v1/chat/completions", raw_nan, "top_p"),
        ("/v1/chat/completions", {**CHAT, "temperature": 1e300}, "temperature must be a finite number"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 1000}}, "logit_bias"),
        ("/v1/chat/completions", {**CHAT, "repetition_penalty": 1e-30}, "repetition_penalty"),
        ("/v1/chat/completions", {**CHAT, "n": LIMITS.max_n + 1}, "--max-n"),
        ("/v1/chat/completions", {**CHAT, "stop": ["x"] * (LIMITS.max_stop + 1)}, "--max-stop"),
        ("/v1/chat/completions", {**CHAT, "stop": "x" * (LIMITS.max_stop_length + 1)}, "--max-stop-length"),
        ("/v1/chat/completions", {**CHAT, "messages": CHAT["messages"] * (LIMITS.max_messages + 1)}, "--max-messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 300}]},
         "--max-content-parts"),
        ("/v1/chat/completions", {**CHAT, "metadata": json.loads("[" * 70 + "]" * 70)}, "--max-json-depth"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 10**30}, "maximum context length"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),
        ("/v1/completions", {**COMPLETION, "min_p": float("inf")}, "min_p"),
        ("/v1/messages", {**MESSAGES, "stop_sequences": ["y"] * (LIMITS.max_stop + 1)}, "--max-stop"),
        ("/v1/messages", {**MESSAGES, "temperature": float("nan")}, "temperature"),
        ("/v1/messages", {**MESSAGES, "system": [{"type": "text", "text": "a"}] * 300}, "--max-content-parts"),
        ("/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "\udc00"}]}, "surrogate"),
        ("/tokenize", {"prompt": "\ud800"}, "surrogate"),
    ]
    for path, body, needle in cases:
        if isinstance(body, dict):  # json.dumps writes NaN/Infinity and lone surrogates (as escapes), as a client could
            body = json.dumps(body).encode()
        assert_error(post(live, path, body), path, 400, needle)


def test_content_type_must_be_json(live):
    for path, body in ROUTES.items():
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"):
            assert_error(post(live, path, body, content_type), path, 415, "application/json")
    ok = post(live, "/v1/chat/completions", CHAT, "application/json; charset=UTF-8")
    assert ok.status_code == 200, ok.text


def _raw_request(live, head: bytes, body_chunks: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed before taking the rest
            pass
        reply = b""
        try:
            while data := sock.recv(65536):
                reply += data
                if b"\r\n\r\n" in reply and b"}" in reply:
                    break
        except ConnectionResetError:  # closed with our body unread: a reset follows the reply (the caller checks it)
            pass
        return reply


def test_body_size_is_413_before_parsing(live):
    limit = LIMITS.max_body_bytes
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n").encode()
    reply = _raw_request(live, head, [])  # declared too large: refused without reading a byte of the body
    assert reply.startswith(b"HTTP/1.1 413") and b"--max-body-size" in reply
    # No Content-Length (chunked): refused once the bytes received pass the limit.
    head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (limit // len(piece) + 2) + [b"0\r\n\r\n"]
    reply = _raw_request(live, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply
    for declared in (b"1" + b"0" * 5000, b"\xb2", b"-1"):  # absurd lengths: a 4xx from uvicorn or from us
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n"
        assert _raw_request(live, head % declared, [b"{}"]).startswith(b"HTTP/1.1 4")
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_health_answers_while_a_large_body_is_parsed_and_tokenized(live):
    """A 1.5 MB prompt takes seconds to tokenize: on worker threads, with the GIL released, /health keeps answering."""
    rng = random.Random(0)
    words = "desert river mountain city forest ocean valley island garden bridge".split()
    text = " ".join(rng.choice(words) for _ in range(250_000))
    body = {**CHAT, "messages": [{"role": "user", "content": text}]}
    result = {}

    def big() -> None:
        start = time.perf_counter()
        result["response"] = post(live, "/v1/chat/completions", body)
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=big)
    thread.start()
    gaps = []
    with httpx.Client() as client:
        while thread.is_alive():
            start = time.perf_counter()
            assert client.get(f"{live.url}/health", timeout=10).status_code == 200
            gaps.append(time.perf_counter() - start)
            time.sleep(0.02)
    thread.join()
    assert_error(result["response"], "/v1/chat/completions", 400, "maximum context length")
    assert result["seconds"] > 0.5 and len(gaps) >= 10, (result["seconds"], len(gaps))
    assert max(gaps) < max(0.5, result["seconds"] / 4), (max(gaps), result["seconds"])


# -- fuzz --------------------------------------------------------------------------------------

FUZZ_REQUESTS = 240
FUZZ_SEED = 19
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "n", "stop", "stop_sequences", "seed", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_tokens", "stream", "stream_options", "echo", "system",
          "stop_token_ids", "ignore_eos", "metadata", "response_format", "tools", "best_of", "chat_template_kwargs",
          "add_generation_prompt", "skip_special_tokens", "user", "guided_json", "guided_regex", "guided_choice",
          "grammar", "json_schema", "structured_outputs"]
# Raw JSON text, so values Python's json would not write (NaN, 1e309, lone surrogates, deep nesting) are sent too.
VALUES = ["null", "true", "false", "0", "-1", "1", "2", "3", "17", "2147483648", "9223372036854775808",
          "18446744073709551616", "1e309", "-1e309", "NaN", "Infinity", "-0.0", "1e-300", "0.5", "1.5", "100", "-100",
          '""', '"x"', '"\\ud800"', '"\\udfff tail"', '"\\u0000"', '"' + "s" * 300 + '"', "[]", "{}", '["a"]',
          '["a", "b", "c"]', "[1, 2, 3]", "[-1]", "[[1, 2]]", "[" * 70 + "]" * 70, "[" * 5000 + "]" * 5000,
          '{"a": 1}', '{"5": 10}',
          '{"5": 1e309}', '{"99999999": 1}', '{"include_usage": true}', '{"type": "json_object"}',
          # structured output: schemas, regexes and grammars that are deep, broken or impossible
          '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}',
          '{"type": "object", "properties": {"a": {"type": "integer", "minimum": 1e308, "maximum": -1}}}',
          '"' + "[" * 3000 + '"', '"(a|b"', '"root ::= "', '"[a-"', '{"regex": "a{99999999}"}', '{"choice": []}',
          '{"json": "{\\"type\\": \\"string\\"}"}',
          '[{"role": "user", "content": "hi"}]', '[{"role": "robot", "content": "hi"}]',
          '[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]',
          '[{"role": "user", "content": [{"type": "image", "source": {}}]}]', '[{"role": "user"}]',
          '[{"role": "user", "content": null}]', '[{"role": "assistant", "content": "x"}]', "[" + '"x",' * 40 + '"x"]',
          '[{"role": "user", "content": "\\ud83d"}]', '[{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]',
          '[{"role": "user", "content": "' + "word " * 300 + '"}]']


def _mutated(base: dict, rng: random.Random) -> tuple[bytes, str]:
    """A mutated body as raw bytes, and its content type."""
    fields = {key: json.dumps(value) for key, value in base.items()}
    for _ in range(rng.choice([1, 1, 2, 3])):
        action = rng.random()
        if action < 0.2 and fields:
            del fields[rng.choice(sorted(fields))]
        elif action < 0.5:  # a field the body has
            fields[rng.choice(sorted(fields) or FIELDS)] = rng.choice(VALUES)
        elif action < 0.85:
            fields[rng.choice(FIELDS)] = rng.choice(VALUES)
        else:  # the messages themselves
            fields["messages"] = rng.choice(VALUES[-13:])
    text = "{" + ", ".join(f'"{key}": {value}' for key, value in fields.items()) + "}"
    roll = rng.random()
    if roll < 0.06:
        text = text[:rng.randrange(len(text))]  # truncated
    elif roll < 0.12:
        at = rng.randrange(len(text))
        text = text[:at] + rng.choice('{}[]",:\\x0') + text[at + 1:]
    content_type = "text/plain" if rng.random() < 0.03 else "application/json"
    return text.encode("utf-8", "surrogatepass"), content_type


def test_fuzzed_requests_get_2xx_or_a_4xx_json_error(live):
    rng = random.Random(FUZZ_SEED)
    cases = [(path, *_mutated(ROUTES[path], rng)) for path in (rng.choice(sorted(ROUTES)) for _ in range(FUZZ_REQUESTS))]
    failures: list[str] = []
    statuses: dict[int, int] = {}

    async def one(client: httpx.AsyncClient, limit: asyncio.Semaphore, path: str, body: bytes, content_type: str) -> None:
        async with limit:
            try:
                async with client.stream("POST", path, content=body, headers={"content-type": content_type}) as response:
                    text = (await response.aread()).decode()
            except httpx.ReadTimeout:  # a long generation the fuzz asked for: hang up (the server must abort it)
                statuses[0] = statuses.get(0, 0) + 1
                return
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            where = f"{path} {body[:300]!r}: {response.status_code} {text[:300]}"
            if response.status_code >= 500 or not 200 <= response.status_code < 500:
                failures.append(where)
            elif response.status_code >= 400:
                error = json.loads(text)
                shaped = error.get("type") == "error" if path.startswith("/v1/messages") else "message" in error.get("error", {})
                if not shaped:
                    failures.append(f"badly shaped error: {where}")
            elif response.headers["content-type"].startswith("text/event-stream"):
                if '"server_error"' in text or '"api_error"' in text:
                    failures.append(f"error in the stream: {where}")
            else:
                json.loads(text)

    async def run() -> None:
        limit = asyncio.Semaphore(6)
        async with httpx.AsyncClient(base_url=live.url, timeout=httpx.Timeout(3.0, connect=10.0)) as client:
            await asyncio.gather(*(one(client, limit, *case) for case in cases))

    asyncio.run(run())
    assert not failures, "\n".join(failures[:10])
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= FUZZ_REQUESTS // 3, statuses
    _wait_idle(live)
    assert httpx.get(f"{live.url}/health").status_code == 200
    after = post(live, "/v1/chat/completions", CHAT)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


def test_cli_limit_flags_match_request_limits():
    from cholla.cli import LIMIT_OPTIONS, _request_limits, build_parser

    defaults = RequestLimits()
    for _, field, _, default in LIMIT_OPTIONS:  # the help's defaults are the dataclass's
        assert default == getattr(defaults, field) / (2**20 if field == "max_body_bytes" else 1)
    assert _request_limits(build_parser().parse_args(["serve"])) == defaults
    args = build_parser().parse_args(["serve", "--max-body-size", "0.5", "--max-n", "2", "--max-stop", "1"])
    assert _request_limits(args) == RequestLimits(max_body_bytes=2**19, max_n=2, max_stop=1)
