"""Hermes / Qwen 2.5 / Qwen 3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call.

Text may come before, between and after the blocks. A last block the model ends
without ``</tool_call>`` (it stopped at end-of-turn) still counts.
"""

from __future__ import annotations

from cholla.tool_calling.json_scan import scan_object, skip_ws
from cholla.tool_calling.parser import Item, NotACall, PartialCall, ToolParser, json_call

START, END = "<tool_call>", "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"
    markers = (START,)

    def items(self, text: str, final: bool) -> list[Item]:
        items: list[Item] = []
        pos = 0
        while True:
            start = text.find(START, pos)
            if start < 0:
                items.append(text[pos:])
                return items
            items.append(text[pos:start])
            body = skip_ws(text, start + len(START))
            if body >= len(text):
                items.append(PartialCall(None, ""))
                return items
            if text[body] != "{":
                raise NotACall(f"{START} is not followed by a JSON object")
            obj = scan_object(text, body)
            call = json_call(obj, text, ("arguments", "parameters"))
            items.append(call)
            if obj.end is None:
                return items
            after = skip_ws(text, obj.end)
            if text.startswith(END, after):
                pos = after + len(END)
            elif END.startswith(text[after:]):  # the end tag still coming, or left out at the end
                return items
            else:
                pos = obj.end
