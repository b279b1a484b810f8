"""Chat templates rendered by cholla against transformers' ``apply_chat_template``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cholla.download import resolve_model
from cholla.errors import ChatTemplateError
from cholla.formats.gguf import read_gguf
from cholla.tokenizer import ChatTemplate, Tokenizer, encode_chat


def model_file(name: str) -> Path:
    """The real model, fetched into cholla's cache on first use (as the model tests do)."""
    return resolve_model(name)


SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
USER = {"role": "user", "content": "What is the capital of France? 🇫🇷"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
USER2 = {"role": "user", "content": "And of Japan — 日本?"}

CONVERSATIONS = {
    "single-turn": [USER],
    "multi-turn": [USER, ASSISTANT, USER2],
    "system": [SYSTEM, USER],
    "system-multi-turn": [SYSTEM, USER, ASSISTANT, USER2],
    "ends-with-assistant": [USER, ASSISTANT],
}


@pytest.fixture(scope="module")
def smollm2():
    """(our Tokenizer, our ChatTemplate, transformers' tokenizer) for SmolLM2."""
    path = model_file("smollm2")
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = Tokenizer.from_gguf(read_gguf(path).metadata)
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tokenizer, ChatTemplate.for_tokenizer(tokenizer), hf


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_smollm2_renders_like_transformers(smollm2, conversation, add_generation_prompt):
    tokenizer, template, hf = smollm2
    messages = CONVERSATIONS[conversation]
    assert not template.is_fallback
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert encode_chat(tokenizer, template, messages, add_generation_prompt) == expected_ids


def test_content_parts_become_text(smollm2):
    tokenizer, template, hf = smollm2
    parts = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second line."}]
    expected = hf.apply_chat_template([{"role": "user", "content": "First line.\nSecond line."}], tokenize=False,
                                      add_generation_prompt=True)
    assert template.render([{"role": "user", "content": parts}]) == expected
    with pytest.raises(ChatTemplateError, match="image"):
        template.render([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}])


def test_none_fields_are_dropped(smollm2):
    _, _, hf = smollm2
    source = "{% for m in messages %}{{ m.role }}:{{ m.content if 'content' in m else '-' }};{% endfor %}"
    messages = [{"role": "assistant", "content": None, "tool_calls": None}]
    assert ChatTemplate(source).render(messages) == hf.apply_chat_template(messages, chat_template=source, tokenize=False)


def test_helpers_like_transformers(smollm2):
    """tojson (non-ASCII kept, indent), loop controls, namespaces and extra variables, as transformers renders them."""
    _, _, hf = smollm2
    source = (
        "{% set ns = namespace(count=0) %}"
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% set ns.count = ns.count + 1 %}{{ m | tojson }}\n{% endfor %}"
        "{{ tools | tojson(indent=2) }}\n{{ ns.count }} {{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}GO{% endif %}"
    )
    messages = [SYSTEM, USER, ASSISTANT]
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "東京"}}}]
    ours = ChatTemplate(source, hf.bos_token, hf.eos_token).render(messages, add_generation_prompt=True, tools=tools)
    expected = hf.apply_chat_template(messages, chat_template=source, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours == expected
    assert "東京" in ours and '\n  {\n    "type"' in ours


def test_raise_exception_is_chat_template_error():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok")
    assert template.render([USER]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        template.render([ASSISTANT])


def test_syntax_error_is_chat_template_error():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")


def test_render_failure_is_chat_template_error():
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[0].content + 1 }}").render([USER])


def test_chatml_fallback():
    template = ChatTemplate(None, "<s>", "</s>")
    assert template.is_fallback
    assert template.render([SYSTEM, USER]) == (
        f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\n{USER['content']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


GEMMA_TURNS = (
    "<bos><start_of_turn>user\nYou answer in one short sentence.\n\nWhat is the capital of France? 🇫🇷<end_of_turn>\n"
    "<start_of_turn>model\nParis.<end_of_turn>\n"
    "<start_of_turn>user\nAnd of Japan — 日本?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_gemma_fallback_turn_format():
    template = ChatTemplate(None, "<bos>", "<eos>", special_tokens=["<bos>", "<start_of_turn>", "<end_of_turn>"])
    assert template.is_fallback
    assert template.render([SYSTEM, USER, ASSISTANT, USER2]) == GEMMA_TURNS
    assert template.render([USER], add_generation_prompt=False) == (
        f"<bos><start_of_turn>user\n{USER['content']}<end_of_turn>\n"
    )


@pytest.fixture(scope="module")
def gemma3():
    path = model_file("gemma3")
    return Tokenizer.from_gguf(read_gguf(path).metadata)


def test_gemma3_uses_turn_fallback_with_one_bos(gemma3):
    template = ChatTemplate.for_tokenizer(gemma3)
    assert gemma3.chat_template is None and template.is_fallback
    messages = [SYSTEM, USER, ASSISTANT, USER2]
    assert template.render(messages) == GEMMA_TURNS
    ids = encode_chat(gemma3, template, messages)
    # The template writes <bos>; encoding adds no second one.
    assert ids == gemma3.encode(GEMMA_TURNS, add_special_tokens=False)
    assert ids[0] == gemma3.bos_token_id and ids[1] == gemma3.token_to_id("<start_of_turn>")
    assert ids.count(gemma3.bos_token_id) == 1
    # A template that leaves BOS out still gets it, since the model asks for BOS.
    no_bos = ChatTemplate(template.source.replace("{{ bos_token }}", ""), special_tokens=gemma3.special_tokens)
    assert encode_chat(gemma3, no_bos, messages) == ids


# Tool definitions and tool history through real models' templates (tests/fixtures/tool_templates/SOURCES.md).
TOOL_TEMPLATES = Path(__file__).parent / "fixtures" / "tool_templates"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"},
                                                    "days": {"type": "integer"}}, "required": ["city"]}}}
CALL_ID = "abcDEF123"  # Mistral's templates insist on 9 letters and digits
TOOL_HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    # As the OpenAI API carries it: arguments as JSON text (transformers takes dicts: see _hf_messages).
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21 C"},
]


def _hf_messages(messages: list[dict]) -> list[dict]:
    import json

    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]]}
        out.append(message)
    return out


@pytest.fixture(scope="module")
def plain_hf_tokenizer():
    """A transformers tokenizer that only carries BOS/EOS: rendering needs no vocabulary."""
    from tokenizers import Tokenizer as Backend, models
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("history", [2, 4], ids=["question", "call-and-result"])
@pytest.mark.parametrize("with_tools", [True, False], ids=["tools", "no-tools"])
@pytest.mark.parametrize("name", sorted(p.stem for p in TOOL_TEMPLATES.glob("*.jinja")))
def test_tool_templates_render_like_transformers(plain_hf_tokenizer, name, with_tools, history):
    source = (TOOL_TEMPLATES / f"{name}.jinja").read_text()
    template = ChatTemplate(source, "<s>", "</s>")
    assert template.supports_tools
    messages, tools = TOOL_HISTORY[:history], [WEATHER_TOOL] if with_tools else None
    expected = plain_hf_tokenizer.apply_chat_template(_hf_messages(messages), tools=tools, chat_template=source,
                                                      tokenize=False, add_generation_prompt=True)
    assert template.render(messages, tools=tools) == expected
    if with_tools:
        assert "get_weather" in expected and "The city" in expected


def test_generic_tool_format_for_templates_without_tools(smollm2):
    """SmolLM2's template never reads ``tools``: they go to a system prompt, calls and results into plain turns."""
    from cholla.tool_calling.hermes import HermesParser

    _, template, hf = smollm2
    assert not template.supports_tools
    rendered = template.render(TOOL_HISTORY, tools=[WEATHER_TOOL])
    assert rendered.startswith("<|im_start|>system\nBe brief.\n\nYou can call these functions.")
    assert '"name": "get_weather"' in rendered and "<tool_call>" in rendered
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in rendered
    # The assistant turn as rendered is what the generic format's parser reads back.
    turn = rendered.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, calls = HermesParser().parse(turn)
    assert content is None and [(c.name, c.arguments_dict) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})]
    # And the messages the template got are plain turns transformers renders the same way.
    from cholla.tool_calling.generic import generic_messages

    plain = generic_messages(TOOL_HISTORY, [WEATHER_TOOL])
    assert rendered == hf.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)


def test_tool_call_arguments_must_be_json():
    template = ChatTemplate((TOOL_TEMPLATES / "qwen2.5.jinja").read_text())
    bad = [TOOL_HISTORY[1], {"role": "assistant", "content": "", "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}]
    with pytest.raises(ChatTemplateError, match="not JSON"):
        template.render(bad)
