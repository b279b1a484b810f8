"""Reasoning parsers on fixed texts: what each format separates, and streaming that agrees with the whole text
however the text is cut (one character at a time, and in two pieces at every position)."""

from __future__ import annotations

import pytest

from cholla.reasoning import PARSERS, ReasoningParserError, Split, choose_parser

THINK = [
    # (text, prompt opened <think>, expected reasoning, expected answer)
    ("<think>\nLet me add.\n2+2=4\n</think>\n\nIt is 4.", False, "Let me add.\n2+2=4", "It is 4."),
    ("  <think>x</think>y", False, "x", "y"),
    ("<think>\n\n</think>\n\nHi", False, "", "Hi"),
    ("Hello <think>not reasoning</think>", False, None, "Hello <think>not reasoning</think>"),
    ("No tags at all.", False, None, "No tags at all."),
    ("<thin", False, None, "<thin"),
    ("", False, None, ""),
    ("<think>\nstill thinking when cut off <", False, "still thinking when cut off <", ""),
    ("Prompt opened it.\n</think>\n\nAnswer </thin", True, "Prompt opened it.", "Answer </thin"),
    ("never closed  \n", True, "never closed", ""),
    ("a < b </ c </think>d", True, "a < b </ c", "d"),
    ("", True, "", ""),
]

HARMONY = [
    ("<|channel|>analysis<|message|>User greets. Reply.<|end|><|start|>assistant<|channel|>final<|message|>Hello!",
     "User greets. Reply.", "Hello!"),
    ("<|channel|>final<|message|>Just the answer.<|return|>", None, "Just the answer."),
    ("<|channel|>analysis<|message|>one<|end|><|start|>assistant<|channel|>analysis<|message|>two<|end|>"
     "<|start|>assistant<|channel|>final<|message|>done", "one\ntwo", "done"),
    ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
     " <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>", "Need weather.",
     "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>"),
    ("<|channel|>analysis<|message|>cut off mid <|en", "cut off mid <|en", ""),
    ("<|channel|>analysis<|message|>x<|end|><|start|>assist", "x", ""),
    ("Plain text from a model that ignores the format.", None, "Plain text from a model that ignores the format."),
    ("<|channel|>final<|message|>a<|end|>\n trailing words", None, "a\n trailing words"),
    ("<|sta", None, ""),
    ("", None, ""),
]


def _streamed(parser, text: str, pieces: list[str], starts: bool) -> Split:
    stream = parser.stream(starts)
    reasoning, content, seen = "", "", False
    for part in [*(stream.feed(p) for p in pieces), stream.finish()]:
        reasoning += part.reasoning or ""
        content += part.content
        seen = seen or part.reasoning is not None
    return Split(reasoning if seen else None, content)


def _cuts(text: str) -> list[list[str]]:
    singles = [list(text)]
    halves = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    return singles + halves


@pytest.mark.parametrize("text,starts,reasoning,content", THINK)
def test_think_whole_and_streamed(text, starts, reasoning, content):
    parser = PARSERS["think"]
    assert parser.split(text, starts) == Split(reasoning, content)
    for pieces in _cuts(text):
        assert _streamed(parser, text, pieces, starts) == Split(reasoning, content), pieces


@pytest.mark.parametrize("text,reasoning,content", HARMONY)
def test_harmony_whole_and_streamed(text, reasoning, content):
    parser = PARSERS["harmony"]
    assert parser.split(text) == Split(reasoning, content)
    for pieces in _cuts(text):
        assert _streamed(parser, text, pieces, False) == Split(reasoning, content), pieces


def test_streamed_reasoning_arrives_before_the_answer_ends():
    """Deltas flow as they come: nothing but a possible marker is held back."""
    stream = PARSERS["think"].stream()
    assert stream.feed("<think>Step one") == Split("Step one", "")
    assert stream.feed(" and two </th") == Split(" and two", "")
    assert stream.feed("ink>\n\nThe answer") == Split("", "The answer")
    harmony = PARSERS["harmony"].stream()
    assert harmony.feed("<|channel|>analysis<|message|>Hmm") == Split("Hmm", "")
    assert harmony.feed("<|end|><|start|>assistant<|channel|>final<|message|>Hi") == Split("", "Hi")


def test_prompt_opened_reasoning_is_detected_from_the_prompt_end():
    think = PARSERS["think"]
    assert think.starts_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not think.starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not think.starts_in_reasoning("<|im_start|>assistant\n")
    assert not PARSERS["harmony"].starts_in_reasoning("<|start|>assistant")


def test_choose_parser_from_the_template():
    assert choose_parser("auto", "{{ '<|start|>assistant<|channel|>final<|message|>' }}").name == "harmony"
    assert choose_parser("auto", "{%- if '</think>' in content %}...{% endif %}").name == "think"
    assert choose_parser("auto", "{{ '<|im_start|>assistant\n' }}") is None
    assert choose_parser("auto", None) is None
    assert choose_parser("none", "</think>") is None
    assert choose_parser("qwen3", None).name == "think"
    assert choose_parser("openai_gptoss", None).name == "harmony"
    with pytest.raises(ReasoningParserError, match="unknown reasoning parser 'magic'"):
        choose_parser("magic", None)
