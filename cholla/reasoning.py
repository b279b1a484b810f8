"""Separate a reasoning model's thinking from its answer, as vLLM's ``--reasoning-parser`` does.

A parser per output format, each in two forms that agree exactly: ``split(text)``
for a whole completion, and ``stream()`` for one that arrives in pieces (text
that could still turn into a marker, such as a trailing ``</thi``, is held back
until the next piece decides it).

- ``think``: ``<think>reasoning</think>answer`` (Qwen 3, DeepSeek-R1, QwQ). When
  the prompt already opened ``<think>`` (templates that force thinking), the
  output starts inside the reasoning. Reasoning that never closes (cut off by
  ``max_tokens``) is all reasoning.
- ``harmony``: GPT-OSS channels, ``<|channel|>analysis<|message|>...<|end|>``
  then ``<|start|>assistant<|channel|>final<|message|>...``. ``analysis`` is
  reasoning, ``final`` the answer; any other message (a ``commentary`` tool
  call) stays in the answer as its raw text, for a tool parser to read.

``choose_parser(setting, template_source)`` picks one from the chat template
for ``--reasoning-parser auto``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cholla.errors import ChollaError


class ReasoningParserError(ChollaError):
    """An unknown ``--reasoning-parser`` name."""


@dataclass
class Split:
    """A completion's two parts. ``reasoning`` is None when the output has no reasoning at all."""

    reasoning: str | None
    content: str


def _held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of one of ``markers``."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


# -- <think> ... </think> ------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(text: str, starts_in_reasoning: bool = False) -> Split:
    """The whole-text form: reasoning and answer, each stripped of the blank lines around the tags."""
    body = text
    if not starts_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return Split(None, text)
        body = stripped[len(THINK_OPEN):]
    reasoning, closed, content = body.partition(THINK_CLOSE)
    return Split(reasoning.strip(), content.lstrip() if closed else "")


@dataclass
class ThinkStream:
    """The incremental form of ``split_think``: ``feed`` pieces, then ``finish``; each returns new text."""

    starts_in_reasoning: bool = False
    _state: str = "start"  # start -> reasoning_start -> reasoning -> answer_start -> answer
    _pending: str = ""
    _seen_reasoning: bool = False

    def __post_init__(self) -> None:
        if self.starts_in_reasoning:
            self._state, self._seen_reasoning = "reasoning_start", True

    def feed(self, piece: str) -> Split:
        self._pending += piece
        reasoning, content = [], []
        while self._pending:
            if self._state == "start":
                stripped = self._pending.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._state, self._pending, self._seen_reasoning = "reasoning_start", stripped[len(THINK_OPEN):], True
                elif not stripped or THINK_OPEN.startswith(stripped):
                    break  # blank so far, or the beginning of <think>
                else:
                    self._state = "answer"
            elif self._state in ("reasoning_start", "answer_start"):
                stripped = self._pending.lstrip()
                if not stripped:
                    self._pending = ""  # blank lines after a tag are dropped
                    break
                self._pending = stripped
                self._state = "reasoning" if self._state == "reasoning_start" else "answer"
            elif self._state == "reasoning":
                before, closed, after = self._pending.partition(THINK_CLOSE)
                if closed:
                    reasoning.append(before.rstrip())
                    self._state, self._pending = "answer_start", after
                    continue
                # Keep back what may become </think>, and trailing blanks that would then be stripped.
                keep = _held_suffix(self._pending, (THINK_CLOSE,))
                ready = self._pending[: len(self._pending) - keep]
                body = ready.rstrip()
                reasoning.append(body)
                self._pending = ready[len(body):] + self._pending[len(ready):]
                break
            else:  # answer
                content.append(self._pending)
                self._pending = ""
        return self._result(reasoning, content)

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far has opened a reasoning that has not closed."""
        return self._state in ("reasoning_start", "reasoning")

    def finish(self) -> Split:
        """What was held back, once the completion has ended."""
        pending, self._pending = self._pending, ""
        if self._state == "start":
            return self._result([], [pending])  # no <think>: all of it is the answer
        if self._state == "reasoning":
            return self._result([pending.rstrip()], [])
        return self._result([], [])

    def _result(self, reasoning: list[str], content: list[str]) -> Split:
        return Split("".join(reasoning) if self._seen_reasoning else None, "".join(content))


# -- GPT-OSS harmony channels ----------------------------------------------------------------

CHANNEL, MESSAGE, START = "<|channel|>", "<|message|>", "<|start|>"
MESSAGE_ENDS = ("<|end|>", "<|call|>", "<|return|>")


def _channel(header: str) -> str:
    """``analysis`` from ``<|start|>assistant<|channel|>analysis`` (or ``commentary to=functions.f ...``)."""
    name = header.split(CHANNEL, 1)[1] if CHANNEL in header else ""
    return name.split("<|", 1)[0].split(" ", 1)[0].strip()


def _message_end(text: str, start: int) -> tuple[int, str]:
    """Where the body starting at ``start`` ends, and the marker that ends it ("" at the end of text)."""
    found = [(text.find(marker, start), marker) for marker in MESSAGE_ENDS]
    found = [(at, marker) for at, marker in found if at >= 0]
    return min(found) if found else (len(text), "")


def _is_header_start(head: str) -> bool | None:
    """True when ``head`` opens a message header, None while it may still become one, False otherwise."""
    if head.startswith((START, CHANNEL)):
        return True
    return None if START.startswith(head) or CHANNEL.startswith(head) else False


def split_harmony(text: str) -> Split:
    """The whole-text form: analysis bodies (joined by newlines) and final bodies, other messages raw.

    Blank text between messages and a header cut off by the end are dropped; text that is
    not a message header (a model that left the format) is answer text from there on.
    """
    reasoning: list[str] = []
    content: list[str] = []
    position = 0
    while position < len(text):
        rest = text[position:]
        head = rest.lstrip()
        opens = _is_header_start(head) if head else None
        if opens is False:
            content.append(rest)
            break
        header_end = text.find(MESSAGE, position)
        if opens is None or header_end < 0:
            break
        body_start = header_end + len(MESSAGE)
        body_end, marker = _message_end(text, body_start)
        channel = _channel(text[position:header_end])
        if channel == "analysis":
            reasoning.append(text[body_start:body_end])
        elif channel == "final":
            content.append(text[body_start:body_end])
        else:
            content.append(text[position:body_end + len(marker)])
        position = body_end + len(marker)
    return Split("\n".join(reasoning) if reasoning else None, "".join(content))


@dataclass
class HarmonyStream:
    """The incremental form of ``split_harmony``."""

    _pending: str = ""
    _channel: str | None = None  # the open message's channel; None between messages
    _raw: bool = False  # the open message is copied to the answer as raw text
    _plain: bool = False  # the output is not harmony at all: everything is answer text
    _reasoning_messages: int = 0
    _reasoning_texts: list[str] = field(default_factory=list)

    def feed(self, piece: str) -> Split:
        self._pending += piece
        reasoning, content = [], []
        while self._pending:
            if self._plain:
                content.append(self._pending)
                self._pending = ""
            elif self._channel is None:
                head = self._pending.lstrip()
                opens = _is_header_start(head) if head else None
                if opens is False:
                    self._plain = True
                    continue
                header_end = self._pending.find(MESSAGE)
                if opens is None or header_end < 0:
                    break  # a header still arriving
                header = self._pending[:header_end]
                self._channel = _channel(header)
                self._raw = self._channel not in ("analysis", "final")
                if self._channel == "analysis":
                    self._reasoning_messages += 1
                    if self._reasoning_messages > 1:
                        reasoning.append("\n")
                if self._raw:
                    content.append(self._pending[:header_end + len(MESSAGE)])
                self._pending = self._pending[header_end + len(MESSAGE):]
            else:
                body_end, marker = _message_end(self._pending, 0)
                if not marker:
                    body_end -= _held_suffix(self._pending, MESSAGE_ENDS)
                body = self._pending[:body_end]
                if self._channel == "analysis":
                    reasoning.append(body)
                elif self._channel == "final" or self._raw:
                    content.append(body + (marker if self._raw else ""))
                self._pending = self._pending[body_end + len(marker):]
                if not marker:
                    break
                self._channel = None
        return self._result(reasoning, content)

    @property
    def in_reasoning(self) -> bool:
        return self._channel == "analysis"

    def finish(self) -> Split:
        pending, self._pending = self._pending, ""
        if self._plain:
            return self._result([], [pending])
        if self._channel is None:  # a header cut off: nothing to show
            return self._result([], [])
        if self._channel == "analysis":
            return self._result([pending], [])
        return self._result([], [pending])

    def _result(self, reasoning: list[str], content: list[str]) -> Split:
        return Split("".join(reasoning) if self._reasoning_messages else None, "".join(content))


# -- choosing one ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningParser:
    """One format: its name, the markers its text must keep, and both forms."""

    name: str
    markers: tuple[str, ...]
    close: str  # what ends an open reasoning and starts the answer (a thinking budget appends it)

    def starts_in_reasoning(self, prompt_tail: str) -> bool:
        """Whether the prompt (its rendered end) already opened the reasoning."""
        return self.name == "think" and prompt_tail.rstrip().endswith(THINK_OPEN)

    def split(self, text: str, starts_in_reasoning: bool = False) -> Split:
        return split_think(text, starts_in_reasoning) if self.name == "think" else split_harmony(text)

    def stream(self, starts_in_reasoning: bool = False) -> ThinkStream | HarmonyStream:
        return ThinkStream(starts_in_reasoning) if self.name == "think" else HarmonyStream()


PARSERS = {
    "think": ReasoningParser("think", (THINK_OPEN, THINK_CLOSE), THINK_CLOSE + "\n\n"),
    "harmony": ReasoningParser("harmony", (CHANNEL, MESSAGE, START, *MESSAGE_ENDS),
                               f"<|end|>{START}assistant{CHANNEL}final{MESSAGE}"),
}
# vLLM's names for the same formats.
ALIASES = {"qwen3": "think", "deepseek_r1": "think", "deepseek_v3": "think", "openai_gptoss": "harmony", "gpt_oss": "harmony"}


def effort_template_kwargs(effort: str | None) -> dict[str, object]:
    """OpenAI's ``reasoning_effort`` as chat templates read it: Qwen 3's ``enable_thinking``, GPT-OSS's ``reasoning_effort``."""
    if effort is None:
        return {}
    if effort == "none":
        return {"enable_thinking": False}
    levels = {"minimal": "low", "xhigh": "high"}
    return {"enable_thinking": True, "reasoning_effort": levels.get(effort, effort)}


def choose_parser(setting: str, template_source: str | None) -> ReasoningParser | None:
    """The parser for ``--reasoning-parser``: a name, ``none``, or ``auto`` (from the chat template's markers)."""
    setting = ALIASES.get(setting, setting)
    if setting == "none":
        return None
    if setting == "auto":
        source = template_source or ""
        if CHANNEL in source and MESSAGE in source:
            return PARSERS["harmony"]
        if THINK_CLOSE in source:
            return PARSERS["think"]
        return None
    if setting not in PARSERS:
        names = ", ".join(["auto", "none", *PARSERS, *ALIASES])
        raise ReasoningParserError(f"unknown reasoning parser {setting!r}; choose one of {names}")
    return PARSERS[setting]
