"""Llama 3.1 / 3.2 / 3.3 JSON: ``{"name": ..., "parameters": {...}}`` as the whole reply, after an
optional ``<|python_tag|>``; several calls are separated by ``;``.

A reply that starts with ``{`` is held back until its object shows whether it is a
call (it has a ``name``) or an answer in JSON, which stays content.
"""

from __future__ import annotations

from cholla.tool_calling.json_scan import scan_object, skip_ws
from cholla.tool_calling.parser import Item, NotACall, PartialCall, ToolParser, json_call

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = (PYTHON_TAG,)
    needs_special_tokens = True

    def items(self, text: str, final: bool) -> list[Item]:
        tag = text.find(PYTHON_TAG)
        if tag >= 0:
            items: list[Item] = [text[:tag]]
            pos = tag + len(PYTHON_TAG)
        else:
            first = skip_ws(text, 0)
            if first >= len(text) or text[first] != "{":
                return [text]
            items, pos = [""], first
        while True:
            pos = skip_ws(text, pos)
            if pos >= len(text):
                return items if len(items) > 1 else [*items, PartialCall(None, "")]
            if text[pos] != "{":
                raise NotACall("a Llama 3 call is not a JSON object")
            obj = scan_object(text, pos)
            items.append(json_call(obj, text, ("parameters", "arguments")))
            if obj.end is None:
                return items
            pos = skip_ws(text, obj.end)
            if pos >= len(text):
                return items
            if text[pos] != ";":
                raise NotACall("text after a Llama 3 call")
            items.append("")
            pos += 1
