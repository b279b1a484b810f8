"""Tool-call parsers: each format read whole, read as a stream (which must reassemble to the
whole parse and never show a marker as content), invalid calls left as text, and the
format chosen from real models' templates, whose own renderings of a call parse back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cholla.tokenizer import ChatTemplate
from cholla.tool_calling import PARSERS, ToolCallStream, forced_parser, parser_class
from cholla.tool_calling.forced import NamedParser, RequiredParser
from cholla.tool_calling.schemas import named_schema, required_schema

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}}}},
]
WEATHER = ("get_weather", {"city": "Paris", "days": 2})
TIME = ("get_time", {"zone": "CET"})

# (parser, model output, expected content, expected calls)
CASES = {
    "hermes": ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
                         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
               "Let me look.", [WEATHER, TIME]),
    "hermes-unclosed": ("hermes", '<tool_call>\n{"arguments": {"zone": "CET"}, "name": "get_time"}', None, [TIME]),
    "hermes-string-arguments": ("hermes", '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>',
                                None, [TIME]),
    "qwen3-coder": ("qwen3_coder", "I will check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                                   "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n"
                                   "<parameter=zone>\nCET\n</parameter>\n</function>\n</tool_call>",
                    "I will check.", [WEATHER, TIME]),
    "mistral": ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                           '{"name": "get_time", "arguments": {"zone": "CET"}}]', None, [WEATHER, TIME]),
    "mistral-args": ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
                     "Sure.", [WEATHER, TIME]),
    "llama3-python-tag": ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
                                         '{"name": "get_time", "parameters": {"zone": "CET"}}', None, [WEATHER, TIME]),
    "llama3-bare": ("llama3_json", ' {"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', None, [WEATHER]),
    "required": ("required", '[{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}, '
                             '{"name": "get_time", "parameters": {"zone": "CET"}}]', None, [WEATHER, TIME]),
    "named": ("named", '{"city": "Paris", "days": 2}', None, [WEATHER]),
}


def make_parser(name: str):
    if name == "required":
        return RequiredParser(TOOLS)
    if name == "named":
        return NamedParser(TOOLS, "get_weather")
    return PARSERS[name](TOOLS)


def stream(parser, text: str, chunk: int):
    """Feed ``text`` ``chunk`` characters at a time; check what is shown never needs taking back."""
    s = ToolCallStream(parser)
    content, calls = "", {}
    final_content = parser.scan(text, final=True).content
    for end in [*range(chunk, len(text), chunk), len(text)]:
        piece, deltas = s.feed(text[:end], final=end == len(text))
        content += piece
        assert final_content.startswith(content), f"shown {content!r}, which the whole text does not start with"
        for d in deltas:
            if d.id is not None:
                assert d.index == len(calls) and d.name
                calls[d.index] = [d.id, d.name, d.arguments]
            else:
                calls[d.index][2] += d.arguments
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("case", list(CASES))
def test_whole_parse(case):
    name, text, content, expected = CASES[case]
    got_content, calls = make_parser(name).parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_stream_reassembles_to_whole_parse(case, chunk):
    name, text, _, _ = CASES[case]
    parser = make_parser(name)
    whole_content, whole_calls = parser.parse(text)
    content, calls = stream(parser, text, chunk)
    assert content == (whole_content or "")
    assert [(n, a) for _, n, a in calls] == [(c.name, c.arguments) for c in whole_calls]


@pytest.mark.parametrize("name", list(PARSERS))
@pytest.mark.parametrize("text", ["Paris is sunny today.  \n", "Use <tool_call> tags, or [TOOL_CALLS], or <|python", "{}", ""])
def test_plain_text_stays_as_is(name, text):
    parser = make_parser(name)
    assert parser.parse(text) == (text, [])
    assert stream(parser, text, 2) == (text, [])


@pytest.mark.parametrize("name, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>'),  # not JSON
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off
    ("hermes", '<tool_call>\n["get_weather"]\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    ("llama3_json", '{"answer": 42, "parameters": {}}'),  # JSON, but not a call
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": [1]}]'),  # arguments not an object
    ("qwen3_coder", "<tool_call>\n<function=get_time>\n<parameter=zone>\nCET\n</function>\n</tool_call>"),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Paris"'),
])
def test_invalid_calls_stay_plain_content(name, text):
    assert make_parser(name).parse(text) == (text, [])


def test_qwen3_coder_values_follow_the_schema():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
            "<parameter=extra>\n[1, 2]\n</parameter>\n</function>\n</tool_call>")
    _, [call] = PARSERS["qwen3_coder"](TOOLS).parse(text)
    # city is a string in the schema, days an integer; a parameter the schema lacks stays text.
    assert call.arguments_dict == {"city": "42", "days": 3, "extra": "[1, 2]"}


def test_mistral_ids_are_nine_alphanumerics():
    _, calls = PARSERS["mistral"](TOOLS).parse(CASES["mistral"][1])
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)


def test_stream_sends_id_and_name_before_arguments():
    s = ToolCallStream(PARSERS["hermes"](TOOLS))
    text = CASES["hermes"][1]
    first = next(d for end in range(1, len(text)) for d in s.feed(text[:end])[1])
    assert first.id.startswith("call_") and first.name == "get_weather" and first.arguments == ""


TEMPLATES = Path(__file__).parent / "fixtures" / "tool_templates"


@pytest.mark.parametrize("template, expected", [
    ("qwen2.5", "hermes"), ("qwen3", "hermes"), ("qwen3-coder", "qwen3_coder"), ("llama3.1", "llama3_json"),
    ("mistral-nemo", "mistral"),
])
def test_format_chosen_from_template_reads_its_own_calls(template, expected):
    """The template renders a call in history; the parser chosen from that template reads it back."""
    source = (TEMPLATES / f"{template}.jinja").read_text()
    chat = ChatTemplate(source, "<s>", "</s>")
    parser_type = parser_class(source, chat.supports_tools)
    assert parser_type.name == expected
    user = {"role": "user", "content": "Weather?"}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]}
    before = chat.render([user], add_generation_prompt=True, tools=TOOLS)
    after = chat.render([user, call], add_generation_prompt=False, tools=TOOLS)
    assert after.startswith(before)
    reply = after[len(before):]
    for end in ("<|im_end|>\n", "<|eot_id|>", "</s>"):
        reply = reply.removesuffix(end)
    content, calls = parser_type(TOOLS).parse(reply)
    assert [(c.name, c.arguments_dict) for c in calls] == [WEATHER]


def test_generic_format_for_templates_without_tools():
    chat = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    assert not chat.supports_tools
    assert parser_class(chat.source, chat.supports_tools).name == "hermes"


def test_forced_schemas():
    jsonschema = pytest.importorskip("jsonschema")
    schema = required_schema(TOOLS)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"zone": 1}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    single = required_schema(TOOLS, parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "parameters": {}}] * 2, single)
    assert named_schema(TOOLS, "get_time") == TOOLS[1]["function"]["parameters"]
    assert forced_parser(TOOLS, {"type": "function", "function": {"name": "get_time"}}).function == "get_time"
