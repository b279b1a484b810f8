"""What evaluation and prefill clients send a real ``cholla serve``: prompt logprobs (echo,
``max_tokens: 0``, vLLM's ``prompt_logprobs``), the calls lm-evaluation-harness's
``local-completions`` makes (``/tokenizer_info``, ``/tokenize``, echo + logprobs on token
ids), ``continue_final_message`` and Anthropic prefill, prefix-cache usage, and CORS.

Logprobs are checked against transformers on the same GGUF in float32 (the server
runs float32 too), to 1e-3 per token. ``benchmarks/lm_eval_check.py`` runs lm-eval
itself against the server.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("transformers")

from cholla.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from cholla.serve import ServerSettings, create_app  # noqa: E402
from tests.conftest import hf_gguf_model  # noqa: E402
from tests.test_serve import LiveServer  # noqa: E402

MODEL = "smollm2"
ATOL = 1e-3
TEXT = "The three primary colours of light are red, green and blue; mixed together they make white."
# A small multiple-choice task as lm-eval's loglikelihood requests see it: (context, continuations, answer).
TASK = [
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " Berlin", " Madrid"], 0),
    ("Question: How many legs does a spider have?\nAnswer:", [" six", " eight", " ten"], 1),
    ("Water freezes at a temperature of", [" zero degrees Celsius", " one hundred degrees Celsius"], 0),
]
PREFILL = [{"role": "user", "content": "Name a fruit that is yellow."}, {"role": "assistant", "content": "A yellow fruit is the"}]


@pytest.fixture(scope="module")
def live(smollm2_path):
    # 32-token steps: the prompts are scored over several prefill chunks.
    config = EngineConfig(max_model_len=512, max_num_batched_tokens=32, kv_cache_memory=64 * 2**20, dtype="float32")
    app = create_app(ServerSettings([MODEL]), lambda: LLMEngine(smollm2_path, config))
    with LiveServer(app) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    return hf_gguf_model(smollm2_path)


@torch.inference_mode()
def hf_token_logprobs(model, ids: list[int]) -> list[float]:
    """transformers' logprob of each token after the first, from one forward pass in fp32."""
    logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_logprobs_max_tokens_zero_with_the_openai_sdk(client, live, hf_model):
    tokenizer = live.engine.tokenizer
    ids = tokenizer.encode(TEXT)
    response = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=5, max_tokens=0)
    choice = response.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(hf_token_logprobs(hf_model, ids), abs=ATOL)
    assert all(1 <= len(top) <= 5 for top in lp.top_logprobs[1:])
    assert all(max(top.values()) >= chosen - ATOL for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets

    # Generating after the echo: the prompt's entries, then the new tokens', in one list.
    more = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=1, max_tokens=3, temperature=0)
    c = more.choices[0]
    assert c.text.startswith(TEXT) and len(c.logprobs.tokens) == len(ids) + 3
    assert c.logprobs.token_logprobs[: len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert "".join(c.logprobs.tokens[len(ids):]) == c.text[len(TEXT):]

    # Streamed: the echo and its logprobs lead the first chunk, the new tokens follow.
    chunks = list(client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=1, max_tokens=3,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].text == TEXT and chunks[0].choices[0].logprobs.tokens == lp.tokens
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    streamed = [x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed[1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-5)


def test_vllm_prompt_logprobs_field(client, live, hf_model):
    ids = live.engine.tokenizer.encode(TEXT)
    response = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=1, extra_body={"prompt_logprobs": 2})
    scored = response.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    reference = hf_token_logprobs(hf_model, ids)
    for token_id, entry, want in zip(ids[1:], scored[1:], reference):
        mine = entry[str(token_id)]
        assert mine["logprob"] == pytest.approx(want, abs=ATOL) and mine["rank"] >= 1
        assert 2 <= len(entry) <= 3 and {e["rank"] for k, e in entry.items() if k != str(token_id)} <= {1, 2}
    bad = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": TEXT, "prompt_logprobs": 99})
    assert bad.status_code == 400 and "prompt_logprobs" in bad.json()["error"]["message"]


def test_lm_eval_local_completions_calls_match_transformers(live, hf_model):
    """The requests lm-eval's local-completions sends for loglikelihood, and its parsing of the replies."""
    info = httpx.get(f"{live.url}/tokenizer_info").json()
    assert info["eos_token"] == live.engine.tokenizer.eos_token and info["tokenizer_class"]
    assert info["chat_template"] and info["model_max_length"] == 512

    def encode(text: str) -> list[int]:  # lm-eval's RemoteTokenizer.encode
        reply = httpx.post(f"{live.url}/tokenize", json={"prompt": text, "add_special_tokens": False})
        return reply.json()["tokens"]

    requests = []
    for context, continuations, _ in TASK:
        context_ids = encode(context)
        requests += [(context_ids, encode(context + c)[len(context_ids):]) for c in continuations]
    prompts = [ctx + cont for ctx, cont in requests]
    payload = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    reply = httpx.post(f"{live.url}/v1/completions", json=payload, timeout=120).json()
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    assert len(choices) == len(prompts)
    scores, reference_scores = [], []
    for (ctx, cont), choice in zip(requests, choices):
        token_logprobs = choice["logprobs"]["token_logprobs"][len(ctx) : -1]  # lm-eval drops the generated token
        assert len(token_logprobs) == len(cont)
        reference = hf_token_logprobs(hf_model, ctx + cont)[len(ctx) - 1 :]
        assert token_logprobs == pytest.approx(reference, abs=ATOL)
        scores.append(sum(token_logprobs))
        reference_scores.append(sum(reference))
    at = 0
    for _, continuations, _ in TASK:  # the same choice as transformers makes, right or wrong
        picks, reference_picks = scores[at : at + len(continuations)], reference_scores[at : at + len(continuations)]
        assert max(range(len(picks)), key=picks.__getitem__) == max(range(len(picks)), key=reference_picks.__getitem__)
        at += len(continuations)


def test_continue_final_message_renders_the_template_prefix(client, live):
    from transformers.utils.chat_template_utils import render_jinja_template

    engine = live.engine
    template = live.app.state.ctx.chat_template
    closed = template.render(PREFILL, add_generation_prompt=False)
    (expected,), _ = render_jinja_template([PREFILL], chat_template=template.source, continue_final_message=True)
    assert closed.startswith(expected) and expected.endswith(PREFILL[-1]["content"]) and expected != closed
    expected_ids = engine.tokenizer.encode(expected, add_special_tokens=False)

    kwargs = dict(model=MODEL, messages=PREFILL, max_tokens=6, temperature=0)
    body = {"add_generation_prompt": False, "continue_final_message": True, "prompt_logprobs": 0}
    response = client.chat.completions.create(**kwargs, extra_body=body)
    assert response.usage.prompt_tokens == len(expected_ids)
    scored = response.model_extra["prompt_logprobs"]  # vLLM's shape names each prompt token id
    assert [int(next(iter(entry))) for entry in scored[1:]] == expected_ids[1:]

    with pytest.raises(openai.BadRequestError, match="add_generation_prompt"):
        client.chat.completions.create(**kwargs, extra_body={"continue_final_message": True})

    # Anthropic's prefill is the same prompt; the reply holds only the continuation.
    claude = anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)
    reply = claude.messages.create(model=MODEL, messages=PREFILL, max_tokens=6, extra_body={"temperature": 0})
    assert reply.content[0].text == response.choices[0].message.content
    assert claude.messages.count_tokens(model=MODEL, messages=PREFILL).input_tokens == len(expected_ids)


def test_usage_reports_the_prefix_cache(client, live):
    messages = [{"role": "user", "content": "Describe the water cycle in detail. " * 6}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    block = live.engine.config.block_size
    total = again.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < total - block
    assert again.usage.prompt_tokens_details.cached_tokens == (total - 1) // block * block

    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == (total - 1) // block * block

    claude = anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0)
    usage = claude.messages.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert usage.cache_read_input_tokens == (total - 1) // block * block
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == total
    with claude.messages.stream(model=MODEL, messages=messages, max_tokens=1) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == usage.cache_read_input_tokens


def _preflight(app, origin: str = "http://localhost:3000") -> httpx.Response:
    with TestClient(app) as http:  # the load fails on its thread; CORS answers without the model
        return http.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})


def _unloadable():
    raise RuntimeError("no model in this test")


def test_cors_off_by_default_and_on_with_allowed_origins():
    closed = _preflight(create_app(ServerSettings([MODEL]), _unloadable))
    assert closed.status_code == 405 and "access-control-allow-origin" not in closed.headers

    settings = ServerSettings([MODEL], api_key="sekret", allowed_origins=["http://localhost:3000"])
    app = create_app(settings, _unloadable)
    opened = _preflight(app)
    assert opened.status_code == 200  # no API key needed for the preflight itself
    assert opened.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in opened.headers["access-control-allow-methods"]
    assert "authorization" in opened.headers["access-control-allow-headers"].lower()
    assert _preflight(app, "http://elsewhere.example").status_code == 400
    with TestClient(app) as http:
        health = http.get("/health", headers={"Origin": "http://localhost:3000"})
    assert health.headers["access-control-allow-origin"] == "http://localhost:3000"

    anyone = _preflight(create_app(ServerSettings([MODEL], allowed_origins=["*"]), _unloadable), "http://x.example")
    assert anyone.status_code == 200 and anyone.headers["access-control-allow-origin"] == "*"


def test_cli_origin_lists():
    from cholla.cli import _flag_list

    assert _flag_list(None) is None
    assert _flag_list(["*"]) == ["*"]
    assert _flag_list(['["http://a", "http://b"]', "http://c"]) == ["http://a", "http://b", "http://c"]
