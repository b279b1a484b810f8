"""Tool calling through the real ``openai`` and ``anthropic`` clients against a live server on the default model.

SmolLM2's template has no tool support, so most of these run the generic format; a tiny
random Qwen 3 with Qwen 3's own template runs the Hermes path. Forced calls
(``tool_choice`` required / named / Anthropic ``any``) go through the grammar engine.
Greedy replies are checked against ``LLM.chat`` on a separately loaded copy of the
model, as in ``test_serve.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

from cholla import LLM, SamplingParams
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.serve import ServerSettings, create_app
from tests.test_serve import LiveServer, anthropic_client, openai_client, serving

MODEL = "smollm2"
MAX_MODEL_LEN = 1024
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def reference(smollm2_path) -> LLM:
    return LLM(smollm2_path, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False, kv_cache_memory=48 * 2**20,
               dtype="float32")


@pytest.fixture(scope="module")
def live(smollm2_path):
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, kv_cache_memory=64 * 2**20, dtype="float32")
    with serving(smollm2_path, config, max_queue=16) as server:
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai_client(live)


@pytest.fixture(scope="module")
def claude(live) -> anthropic.Anthropic:
    return anthropic_client(live)


def _streamed_tool_use(claude: anthropic.Anthropic, kwargs: dict):
    """The streamed reply's final message, after checking it streamed a tool_use block with input_json_delta."""
    with claude.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(e.type == "content_block_start" and e.content_block.type == "tool_use" for e in events)
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert final.stop_reason == "tool_use"
    return final


def _reassemble(chunks) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) from OpenAI stream chunks; checks the delta shape."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id is not None:  # the first delta of a call: index, id, type and name
                assert call.index == len(calls) and call.type == "function" and call.function.name
                calls[call.index] = [call.function.name, call.function.arguments or ""]
            else:
                assert call.function.name is None
                calls[call.index][1] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def _check_calls(calls) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_streamed_and_not(client, tool_choice):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=80)
    response = client.chat.completions.create(**kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    _check_calls(calls)
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    if isinstance(tool_choice, dict):
        assert [name for name, _ in calls] == ["get_weather"]
    content, streamed, finish = _reassemble(client.chat.completions.create(stream=True, **kwargs))
    assert (content, streamed, finish) == ("", calls, "tool_calls")


def _plain(messages: list[dict]) -> list[dict]:
    """The messages ``LLM.chat`` takes: OpenAI's, without the SDK's null fields."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _few_shot() -> list[dict]:
    """Three earlier weather questions answered with a call, then Paris: SmolLM2 then calls the tool itself (greedy)."""
    messages = []
    for i, city in enumerate(["London", "Tokyo", "Berlin"]):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "C"})}}
        messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                     {"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": "18 C, sunny"},
                     {"role": "assistant", "content": f"It is sunny in {city}."}]
    return messages + ASK


FEW_SHOT = _few_shot()
GREEDY = SamplingParams(temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def expected_turns(reference):
    """``LLM.chat``'s two turns: the call it makes, then its answer once the tool's result is in."""
    first = reference.chat(FEW_SHOT, GREEDY, use_tqdm=False, tools=TOOLS)[0].outputs[0]
    assert [c.name for c in first.tool_calls] == ["get_weather"]  # the premise of the tests below
    call = first.tool_calls[0]
    history = [*FEW_SHOT, {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    second = reference.chat(history, GREEDY, use_tqdm=False, tools=TOOLS)[0]
    return first, second


def test_auto_tool_call_round_trip(client, expected_turns):
    """Call (whole and streamed alike), tool result, answer: the SDK's own message goes back as ``model_dump()``."""
    first, second = expected_turns
    kwargs = dict(model=MODEL, messages=FEW_SHOT, tools=TOOLS, temperature=0, max_tokens=40)
    reply = client.chat.completions.create(**kwargs).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in reply.message.tool_calls]
    assert calls == [(c.name, c.arguments) for c in first.tool_calls]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    assert reply.message.tool_calls[0].id.startswith("call_") and reply.message.tool_calls[0].type == "function"
    _check_calls(calls)
    content, streamed, finish = _reassemble(client.chat.completions.create(stream=True, **kwargs))
    assert (content, streamed, finish) == ("", calls, "tool_calls")

    dumped = reply.message.model_dump()
    assert {"refusal", "audio", "annotations", "function_call"} <= set(dumped)
    history = [*FEW_SHOT, dumped, {"role": "tool", "tool_call_id": reply.message.tool_calls[0].id, "content": "18 C, sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=40)
    assert answer.choices[0].message.content == second.outputs[0].text and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens == len(second.prompt_token_ids)


ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


def _anthropic(messages: list[dict]) -> list[dict]:
    """OpenAI-shaped history as Anthropic blocks: calls as ``tool_use``, results as a user's ``tool_result``."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": m["tool_call_id"],
                                                     "content": m["content"]}]})
        elif m.get("tool_calls"):
            out.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": json.loads(c["function"]["arguments"])} for c in m["tool_calls"]]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def test_anthropic_tool_use_round_trip(claude, expected_turns):
    first, second = expected_turns
    kwargs = dict(model=MODEL, messages=_anthropic(FEW_SHOT), tools=ANTHROPIC_TOOLS, max_tokens=40,
                  extra_body={"temperature": 0})
    message = claude.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in uses] == [(c.name, c.arguments_dict) for c in first.tool_calls]
    final = _streamed_tool_use(claude, kwargs)
    assert [(b.type, b.name, b.input) for b in final.content] == [(b.type, b.name, b.input) for b in uses]

    history = [*kwargs["messages"], {"role": "assistant", "content": [b.model_dump() for b in message.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 C, sunny"}]}]
    answer = claude.messages.create(**{**kwargs, "messages": history})
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text == second.outputs[0].text
    usage = answer.usage  # Anthropic's input_tokens leaves out what the cache served or took
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == \
        len(second.prompt_token_ids)
    counted = claude.messages.count_tokens(model=MODEL, messages=history, tools=ANTHROPIC_TOOLS)
    assert counted.input_tokens == len(second.prompt_token_ids)


def test_tokenize_renders_tools(live, reference):
    response = httpx.post(f"{live.url}/tokenize", json={"model": MODEL, "messages": FEW_SHOT, "tools": TOOLS})
    expected = reference.encode_messages(FEW_SHOT, tools=TOOLS)
    assert response.status_code == 200 and response.json()["tokens"] == expected
    assert expected != reference.encode_messages(FEW_SHOT)


def test_empty_and_null_tool_fields_are_omitted(live, client):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, "temperature": 0}
    plain = httpx.post(f"{live.url}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    for extra in ({"tools": None}, {"tools": []}, {"functions": None}, {"tool_choice": None}, {"tool_choice": "none"},
                  {"parallel_tool_calls": False}, {"tool_choice": "auto", "tools": []},
                  {"tools": TOOLS, "tool_choice": "none"}):
        response = httpx.post(f"{live.url}/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 200, (extra, response.text)
        message = response.json()["choices"][0]["message"]
        assert message["content"] == plain and "tool_calls" not in message, extra
    for extra, needle in (({"functions": [{"name": "f"}]}, "functions"), ({"frobnicate": None}, "frobnicate"),
                          ({"tool_choice": "required"}, "tool_choice needs tools"),
                          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
                          ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
                          ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "tool_call_id"),
                          ({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]}, "audio")):
        response = httpx.post(f"{live.url}/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 400 and needle in response.json()["error"]["message"], (extra, response.text)
    for extra in ({"tools": None}, {"tools": []}, {"tool_choice": None}):
        response = httpx.post(f"{live.url}/v1/messages", json={**body, **extra})
        assert response.status_code == 200, (extra, response.text)


def test_anthropic_tool_choice_any_streamed_and_not(claude):
    kwargs = dict(model=MODEL, messages=ASK, tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"}, max_tokens=80,
                  extra_body={"temperature": 0})
    message = claude.messages.create(**kwargs)
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and uses
    for block in uses:
        jsonschema.validate(block.input, SCHEMAS[block.name])
    final = _streamed_tool_use(claude, kwargs)
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(b.name, b.input) for b in uses]


def test_llm_chat_returns_tool_calls(reference):
    out = reference.chat(ASK, SamplingParams(temperature=0, max_tokens=80), use_tqdm=False, tools=TOOLS,
                         tool_choice={"type": "function", "function": {"name": "get_time"}})[0].outputs[0]
    assert [c.name for c in out.tool_calls] == ["get_time"]
    jsonschema.validate(out.tool_calls[0].arguments_dict, SCHEMAS["get_time"])


def _langchain(live):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, ConfigDict

    class Weather(BaseModel):
        """The current weather in a city."""

        model_config = ConfigDict(extra="forbid")  # no other keys: a small model would go on writing some
        city: str
        unit: str

    chat = ChatOpenAI(model=MODEL, base_url=f"{live.url}/v1", api_key="unused", temperature=0, max_tokens=48, max_retries=0)
    return chat, Weather


def test_langchain_bind_tools(live):
    """LangChain's tool binding is accepted as it sends it, whole and streamed; what the model calls is parsed."""
    chat, Weather = _langchain(live)
    bound = chat.bind_tools([Weather])
    reply = bound.invoke("What is the weather in Paris?")
    streamed = None
    for chunk in bound.stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.content == reply.content
    assert [c["args"] for c in streamed.tool_calls] == [c["args"] for c in reply.tool_calls]
    for call in reply.tool_calls:
        Weather(**call["args"])


def test_langchain_structured_output_by_function_calling(live):
    chat, Weather = _langchain(live)
    result = chat.with_structured_output(Weather, method="function_calling").invoke("What is the weather in Paris?")
    assert isinstance(result, Weather)
    named = chat.bind_tools([Weather], tool_choice="Weather").invoke("What is the weather in Paris?")
    assert [c["name"] for c in named.tool_calls] == ["Weather"]


# A tiny random Qwen 3 with Qwen 3's own template (it renders tools itself, in the Hermes format) and a
# byte-level vocabulary that has Qwen's <tool_call> tokens. The grammar makes even random weights call.
UNIT_TOOL = {"type": "function", "function": {"name": "set_unit", "description": "Set the unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["C", "F"]}, "ok": {"type": "boolean"}},
    "required": ["unit", "ok"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-qwen3")
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    backend.add_tokens([AddedToken(t, normalized=False) for t in ("<tool_call>", "</tool_call>", "<think>", "</think>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (Path(__file__).parent / "fixtures" / "tool_templates" / "qwen3.jinja").read_text()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        eos_token_id=backend.token_to_id("<|im_end|>"))
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path, tokenizer


def test_qwen3_template_tools_and_hermes_calls(qwen3_folder):
    path, hf = qwen3_folder
    config = EngineConfig(max_model_len=1024, max_num_seqs=4, kv_cache_memory=16 * 2**20, dtype="float32")
    app = create_app(ServerSettings(["qwen"], max_queue=8), lambda: LLMEngine(path, config))
    with LiveServer(app) as server:
        server.wait_ready()
        client = openai_client(server)
        # The prompt is the model's own template with the tools, token for token as transformers renders it.
        tokens = httpx.post(f"{server.url}/tokenize", json={"messages": ASK, "tools": [UNIT_TOOL]}).json()["tokens"]
        assert tokens == hf.apply_chat_template(ASK, tools=[UNIT_TOOL], add_generation_prompt=True, return_dict=False)
        for tool_choice in ("required", {"type": "function", "function": {"name": "set_unit"}}, "auto"):
            kwargs = dict(model="qwen", messages=ASK, tools=[UNIT_TOOL], tool_choice=tool_choice, temperature=1.0,
                          seed=1, max_tokens=96)
            message = client.chat.completions.create(**kwargs).choices[0].message
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
            content, streamed, _ = _reassemble(client.chat.completions.create(stream=True, **kwargs))
            assert (content or None, streamed) == (message.content, calls), tool_choice
            if tool_choice != "auto":  # random weights, forced by the grammar
                assert calls and all(name == "set_unit" for name, _ in calls)
                for _, arguments in calls:
                    jsonschema.validate(json.loads(arguments), UNIT_TOOL["function"]["parameters"])
