"""What every tool-call format shares: a scan of the text so far, a whole-text parse, a stream.

A format (one module each) only says where calls sit in the model's text: it turns
the text into a list of content pieces and calls (``ToolParser.items``). This module
turns that list into the content shown to the user and the calls, for a finished
reply (``ToolParser.parse``) and for a growing one (``ToolCallStream``), with one rule
for both, so a stream always reassembles to the whole-text parse:

- With no call in the text, the content is the text, unchanged.
- Whitespace that touches a call is dropped (the newlines around ``<tool_call>``).
- A call's ``arguments`` must decode to a JSON object and its name must be a
  non-empty string; otherwise the whole text stays plain content, with no calls.
- While a reply grows, text that could be the start of a call marker, and
  whitespace that could precede one, are held back until the next text decides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cholla.tool_calling.call import ToolCall, ToolCallDelta, new_call_id
from cholla.tool_calling.json_scan import ObjectScan, skip_ws


class NotACall(ValueError):
    """The text where a call should be is not one: the reply is plain content."""


@dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str  # the arguments' JSON text so far: a prefix of the final text
    complete: bool = False


Item = str | PartialCall


@dataclass
class Scan:
    content: str
    calls: list[PartialCall]
    plain: bool = False  # the text is not (or stopped being) a tool call


class ToolParser:
    """One model family's tool-call format. ``tools`` are OpenAI tool dicts (some formats need the schemas)."""

    name = "base"
    markers: tuple[str, ...] = ()  # text that starts a call: held back while only partly written
    needs_special_tokens = False  # the markers are special tokens, dropped unless skip_special_tokens=False
    id_prefix, id_length = "call_", 24

    def __init__(self, tools: list[dict[str, Any]] | None = None):
        self.tools = tools or []

    def items(self, text: str, final: bool) -> list[Item]:
        """Content pieces and calls in order; raises ``NotACall`` when the text is not a valid call."""
        raise NotImplementedError

    def new_id(self) -> str:
        return new_call_id(self.id_prefix, self.id_length)

    def scan(self, text: str, final: bool) -> Scan:
        try:
            items = self.items(text, final)
            if final and not all(isinstance(i, str) or _valid(i) for i in items):
                raise NotACall("an incomplete or invalid call")
        except (NotACall, ValueError):
            return Scan(text, [], plain=True)
        calls = [i for i in items if isinstance(i, PartialCall)]
        if not calls:
            return Scan(text if final else self._hold_back(text), [])
        pieces = []
        for k, item in enumerate(items):
            if not isinstance(item, str):
                continue
            if k > 0:  # formats alternate pieces and calls: a call precedes this piece
                item = item.lstrip()
            if k + 1 < len(items):
                item = item.rstrip()
            elif not final:
                item = self._hold_back(item)
            pieces.append(item)
        return Scan("".join(pieces), calls)

    def _hold_back(self, text: str) -> str:
        """``text`` without a tail that may become a marker, nor the whitespace before it."""
        for marker in self.markers:
            for size in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:size]):
                    text = text[:-size]
                    break
        return text.rstrip()

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply. Content is None when it is empty and there are calls."""
        scan = self.scan(text, final=True)
        calls = [ToolCall(self.new_id(), c.name, c.arguments) for c in scan.calls]
        return (scan.content or None) if calls else scan.content, calls


def tagged_calls(text: str, start_tag: str, end_tag: str,
                 call_at: Callable[[str, int], tuple[Item, int | None]]) -> list[Item]:
    """Text and calls of a reply whose calls sit between ``start_tag`` and ``end_tag`` (Hermes,
    Qwen3-Coder). ``call_at(text, at)`` reads the call starting at ``at``: the call and where it
    ends, or None as the end while it is still growing. A last call the model ends without
    ``end_tag`` (it stopped at end-of-turn) still counts."""
    items: list[Item] = []
    pos = 0
    while True:
        start = text.find(start_tag, pos)
        if start < 0:
            items.append(text[pos:])
            return items
        items.append(text[pos:start])
        call, end = call_at(text, skip_ws(text, start + len(start_tag)))
        items.append(call)
        if end is None:
            return items
        after = skip_ws(text, end)
        if text.startswith(end_tag, after):
            pos = after + len(end_tag)
        elif end_tag.startswith(text[after:]):  # the end tag still coming, or left out at the end
            return items
        else:
            pos = end


def _valid(call: PartialCall) -> bool:
    if not call.complete or not isinstance(call.name, str) or not call.name:
        return False
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


def json_call(obj: ObjectScan, text: str, argument_keys: tuple[str, ...]) -> PartialCall:
    """A call written as a JSON object with a ``name`` and an arguments member under one of ``argument_keys``."""
    name = None
    if "name" in obj.members:
        name = json.loads(obj.members["name"])
        if not isinstance(name, str):
            raise NotACall("the call's name is not a string")
    arguments = ""
    key = next((k for k in argument_keys if k in obj.members), None)
    if key is not None:
        arguments = obj.members[key]
        if arguments.startswith('"'):  # some models write the arguments as a JSON string
            arguments = json.loads(arguments)
    elif obj.open_key in argument_keys and text.startswith("{", obj.open_start):
        arguments = text[obj.open_start:]
    elif obj.end is not None:
        arguments = "{}"
    if obj.end is not None and name is None:
        raise NotACall("a JSON object without a 'name'")
    return PartialCall(name, arguments, obj.end is not None)


class ToolCallStream:
    """Feed the growing text of one reply; get back the content and call deltas it adds.

    ``feed(text)`` takes the whole text so far (what ``CompletionOutput.text`` holds),
    ``feed(text, final=True)`` the finished one.
    """

    def __init__(self, parser: ToolParser, max_calls: int | None = None):
        self.parser = parser
        self.max_calls = max_calls  # calls past this many are dropped (parallel_tool_calls=false)
        self.content = ""
        self.calls: list[ToolCall] = []  # as sent so far (arguments grow)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        scan = self.parser.scan(text, final)
        if scan.plain:
            if self.calls or not text.startswith(self.content):
                return "", []  # calls already went out: what follows cannot be taken back
            content, self.content = text[len(self.content):], text
            return content, []
        content = ""
        if scan.content.startswith(self.content):
            content, self.content = scan.content[len(self.content):], scan.content
        deltas = []
        for index, call in enumerate(scan.calls[:self.max_calls]):
            if call.name is None:
                break
            if index == len(self.calls):
                self.calls.append(ToolCall(self.parser.new_id(), call.name, call.arguments))
                deltas.append(ToolCallDelta(index, self.calls[index].id, call.name, call.arguments))
            elif len(call.arguments) > len(self.calls[index].arguments):
                sent = self.calls[index].arguments
                deltas.append(ToolCallDelta(index, arguments=call.arguments[len(sent):]))
                self.calls[index].arguments = call.arguments
        return content, deltas
