"""The HTTP server on the real default model, driven by the real ``openai`` and ``anthropic`` clients.

Every greedy answer is checked against ``LLM.generate`` / ``LLM.chat`` run on a
separately loaded copy of the model: the server must add nothing and lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import anthropic
import httpx
import openai
import pytest
import uvicorn

from cholla import LLM, SamplingParams
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.serve import ServerSettings, create_app

MODEL = "smollm2"
MAX_MODEL_LEN = 512
CHAT = [{"role": "user", "content": "Tell me about deserts."}]
PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):", "1, 2, 3, 4,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def wait_ready(self, headers: dict | None = None, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.url}/ready", headers=headers).status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)

    @property
    def engine(self) -> LLMEngine:
        return self.app.state.ctx.host.engine.engine


@pytest.fixture(scope="module")
def reference(smollm2_path) -> LLM:
    # float32: batch-invariant, so concurrent answers equal one-at-a-time ones exactly.
    return LLM(smollm2_path, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False, kv_cache_memory=32 * 2**20,
               dtype="float32")


@pytest.fixture(scope="module")
def live(smollm2_path):
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=40, kv_cache_memory=128 * 2**20, dtype="float32")
    app = create_app(ServerSettings([MODEL], max_queue=64), lambda: LLMEngine(smollm2_path, config))
    with LiveServer(app) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(live) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)


def _greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def _wait_idle(live: LiveServer) -> None:
    """The engine thread applies aborts asynchronously: wait until nothing runs, then check every block is back."""
    engine = live.engine
    deadline = time.monotonic() + 20
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    manager = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_blocks
    assert live.app.state.ctx.host.num_in_flight == 0


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_health_ready_models_and_page(live, client):
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.get(f"{live.url}/ready").json() == {"status": "ready"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and "html" in page.headers["content-type"]


def test_chat_greedy_equals_llm_chat_with_logprobs(client, reference):
    expected = reference.chat(CHAT, _greedy(8, logprobs=2), use_tqdm=False)[0]
    response = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids) == 8
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion" and response.model == MODEL
    content = choice.logprobs.content
    assert len(content) == 8
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry, (chosen, top) in zip(content, expected.outputs[0].logprobs):
        assert entry.logprob == pytest.approx(chosen, abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the likeliest
        assert bytes(entry.bytes).decode() == entry.token


def test_chat_stream_with_usage(client, reference):
    expected = reference.chat(CHAT, _greedy(8), use_tqdm=False)[0].outputs[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_greedy_prompt_forms_and_stop(client, reference):
    expected = [o.outputs[0] for o in reference.generate(PROMPTS[:2], _greedy(6), use_tqdm=False)]
    ids = reference.tokenizer.encode(PROMPTS[1])
    response = client.completions.create(model=MODEL, prompt=[PROMPTS[0], ids], temperature=0, max_tokens=6)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert response.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPTS[0])) + len(ids)

    stop = expected[0].text.strip()[2:5]
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and expected[0].text.startswith(stopped.choices[0].text)

    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + expected[0].text


def test_completion_logprobs(client, reference):
    expected = reference.generate(PROMPTS[2], _greedy(5, logprobs=3), use_tqdm=False)[0].outputs[0]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=5, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert "".join(logprobs.tokens) == response.choices[0].text == expected.text
    assert logprobs.token_logprobs == pytest.approx([chosen for chosen, _ in expected.logprobs], abs=1e-4)
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets


def test_n_and_seed_streamed_and_not(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], temperature=1.0, max_tokens=6, n=2, seed=7)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    streamed = ["", ""]
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in first.choices]

    chat = dict(model=MODEL, messages=CHAT, temperature=1.0, max_tokens=4, n=2, seed=3)
    whole = [c.message.content for c in client.chat.completions.create(**chat).choices]
    pieces = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **chat):
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert pieces == whole


def test_anthropic_messages_equal_the_chat_reference(claude, reference):
    system = "Answer briefly."
    messages = [{"role": "system", "content": system}, *CHAT]
    expected = reference.chat(messages, _greedy(8), use_tqdm=False)[0]
    greedy = {"extra_body": {"temperature": 0}}  # recent SDKs dropped the sampling arguments
    reply = claude.messages.create(model=MODEL, system=system, messages=CHAT, max_tokens=8, **greedy)
    assert reply.content[0].text == expected.outputs[0].text
    assert reply.stop_reason == "max_tokens"
    usage = reply.usage  # Anthropic's input_tokens leave out the prefix cache's share
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == len(expected.prompt_token_ids)
    assert usage.output_tokens == 8

    with claude.messages.stream(model=MODEL, system=[{"type": "text", "text": system}], messages=CHAT,
                                max_tokens=8, **greedy) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == expected.outputs[0].text
    assert events[:2] == ["message_start", "content_block_start"] and events[-1] == "message_stop"
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8

    stop = expected.outputs[0].text.strip()[3:6]
    stopped = claude.messages.create(model=MODEL, system=system, messages=CHAT, max_tokens=8, stop_sequences=[stop],
                                     **greedy)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop


def test_openai_errors_are_typed(live, client):
    too_long = "word " * 600
    cases = [
        (dict(messages=CHAT, temperature=-1), "temperature"),
        (dict(messages=[{"role": "user", "content": too_long}]), f"{MAX_MODEL_LEN}"),
        (dict(messages=CHAT, max_tokens=600), "max_tokens=600"),
        (dict(messages=CHAT, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "image_url"),
        (dict(messages=CHAT, extra_body={"frobnicate": 1}), "frobnicate"),
        (dict(messages=CHAT, response_format={"type": "xml"}), "response_format type 'xml' is not supported"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model=MODEL, **kwargs)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="Hi", suffix="!")
    with pytest.raises(openai.NotFoundError, match="smollm2"):
        client.chat.completions.create(model="gpt-4", messages=CHAT)

    malformed = httpx.post(f"{live.url}/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{live.url}/v1/nothing-here", json={})
    assert missing.status_code == 404 and "message" in missing.json()["error"]


def test_anthropic_errors_are_typed(live, claude):
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-x", messages=CHAT, max_tokens=4)
    with pytest.raises(anthropic.BadRequestError, match="tools"):
        claude.messages.create(model=MODEL, messages=CHAT, max_tokens=4,
                               tools=[{"name": "f", "input_schema": {"type": "object"}}])
    with pytest.raises(anthropic.BadRequestError, match="context length"):
        claude.messages.create(model=MODEL, messages=CHAT, max_tokens=MAX_MODEL_LEN)
    malformed = httpx.post(f"{live.url}/v1/messages", content=b"[1,", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert malformed.json()["type"] == "error" and malformed.json()["error"]["type"] == "invalid_request_error"


def test_tokenize_detokenize(live, reference):
    ids = httpx.post(f"{live.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert ids["tokens"] == reference.tokenizer.encode(PROMPTS[0]) and ids["max_model_len"] == MAX_MODEL_LEN
    chat = httpx.post(f"{live.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == reference.encode_messages(CHAT) and chat["count"] == len(chat["tokens"])
    text = httpx.post(f"{live.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text == reference.tokenizer.decode(ids["tokens"])


def test_32_concurrent_streams_are_batched_and_exact(live, reference):
    params = _greedy(6)
    expected = {p: o.outputs[0].text for p, o in zip(PROMPTS, reference.generate(PROMPTS, params, use_tqdm=False))}
    before = httpx.get(f"{live.url}/metrics").text
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)

    async def one(prompt: str) -> str:
        text = ""
        async for chunk in await client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6,
                                                           stream=True):
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    async def all_of_them() -> list[str]:
        try:
            return await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(32)))
        finally:
            await client.close()

    texts = asyncio.run(all_of_them())
    assert texts == [expected[PROMPTS[i % len(PROMPTS)]] for i in range(32)]
    metrics = httpx.get(f"{live.url}/metrics").text
    name = 'cholla:iteration_batch_size_bucket{le="1.0",model_name="smollm2"}'
    single = _metric(metrics, name)
    steps = _metric(metrics, "cholla:iteration_batch_size_count")
    assert steps - single > 0, "no engine step ran more than one sequence"
    assert _metric(metrics, 'cholla:request_success_total{finished_reason="length",model_name="smollm2"}') >= 32
    assert _metric(metrics, "cholla:generation_tokens_total") - _metric(before, "cholla:generation_tokens_total") == 32 * 6
    assert _metric(metrics, "cholla:time_to_first_token_seconds_count") >= 32
    _wait_idle(live)


def test_hang_ups_abort_and_free_blocks(live):
    # Far more tokens than any machine makes in the half second before each client gives up.
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"]
                break  # hang up after the first token
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.5)
    _wait_idle(live)
    metrics = httpx.get(f"{live.url}/metrics").text
    assert _metric(metrics, "cholla:kv_cache_usage_perc") == 0.0
    assert _metric(metrics, 'cholla:request_success_total{finished_reason="abort",model_name="smollm2"}') >= 2


def test_loading_state_api_key_and_full_queue(reference):
    """A slow load: /health at once, 503 + Retry-After until loaded; the key guards the rest; a full queue says 503."""
    release = threading.Event()
    key = {"Authorization": "Bearer sekret"}

    def slow_load() -> LLMEngine:
        release.wait(30)
        # A second engine on the reference's weights, one sequence at a time and no queue.
        return LLMEngine(reference.engine.loaded, EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=1,
                                                               kv_cache_memory=32 * 2**20))

    app = create_app(ServerSettings(["tiny"], api_key="sekret", max_queue=0), slow_load)
    with LiveServer(app) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/ready").status_code == 401
        loading = httpx.get(f"{server.url}/ready", headers=key)
        assert loading.status_code == 503 and loading.headers["Retry-After"]
        early = httpx.post(f"{server.url}/v1/completions", headers=key, json={"model": "tiny", "prompt": "Hi"})
        assert early.status_code == 503 and early.headers["Retry-After"] and "loading" in early.json()["error"]["message"]
        release.set()
        server.wait_ready(headers=key)

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
                model="tiny", messages=CHAT, max_tokens=2)
        reply = anthropic.Anthropic(base_url=server.url, api_key="sekret", max_retries=0).messages.create(
            model="tiny", messages=CHAT, max_tokens=2)
        assert reply.usage.output_tokens == 2

        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", headers=key, json=body) as busy:
            lines = busy.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the only slot is taken
            full = httpx.post(f"{server.url}/v1/completions", headers=key, json={**body, "stream": False})
            assert full.status_code == 503 and full.headers["Retry-After"] == "1"
            assert "capacity" in full.json()["error"]["message"]
        engine = app.state.ctx.host.engine.engine
        deadline = time.monotonic() + 20
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_cholla_serve_exits_with_the_load_error(tmp_path):
    """`cholla serve` listens first, then a model that cannot load stops it with one line and status 2."""
    import subprocess
    import sys

    missing = tmp_path / "missing.gguf"
    result = subprocess.run(
        [sys.executable, "-m", "cholla", "serve", str(missing), "--port", str(_free_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Uvicorn running" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("cholla: error: ") and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
