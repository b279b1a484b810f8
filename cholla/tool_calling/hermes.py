"""Hermes / Qwen 2.5 / Qwen 3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call.

Text may come before, between and after the blocks. A last block the model ends
without ``</tool_call>`` (it stopped at end-of-turn) still counts.
"""

from __future__ import annotations

from cholla.tool_calling.json_scan import scan_object
from cholla.tool_calling.parser import Item, NotACall, PartialCall, ToolParser, json_call, tagged_calls

START, END = "<tool_call>", "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"
    markers = (START,)

    def items(self, text: str, final: bool) -> list[Item]:
        return tagged_calls(text, START, END, _json_call)


def _json_call(text: str, body: int) -> tuple[Item, int | None]:
    if body >= len(text):
        return PartialCall(None, ""), None
    if text[body] != "{":
        raise NotACall(f"{START} is not followed by a JSON object")
    obj = scan_object(text, body)
    return json_call(obj, text, ("arguments", "parameters")), obj.end
