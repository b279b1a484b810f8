"""Mistral: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` (Mistral 7B v0.3, Nemo, Small 3),
or, in newer models, ``[TOOL_CALLS]name[ARGS]{...}`` once per call.

``[TOOL_CALLS]`` is a special token, so the text must keep special tokens. The
templates check that call ids are 9 letters and digits, so the ids are made so.
"""

from __future__ import annotations

from cholla.tool_calling.arrays import array_calls
from cholla.tool_calling.json_scan import skip_ws, value_end
from cholla.tool_calling.parser import Item, NotACall, PartialCall, ToolParser

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralParser(ToolParser):
    name = "mistral"
    markers = (MARKER,)
    needs_special_tokens = True
    id_prefix, id_length = "", 9

    def items(self, text: str, final: bool) -> list[Item]:
        start = text.find(MARKER)
        if start < 0:
            return [text]
        items: list[Item] = [text[:start]]
        body = skip_ws(text, start + len(MARKER))
        if body >= len(text):
            return [*items, PartialCall(None, "")]
        if text[body] == "[":
            calls, end = array_calls(text, body, ("arguments",))
            if not calls and end is not None:
                raise NotACall("an empty call array")
            return [*items, *(calls or [PartialCall(None, "")])]
        pos = start
        while True:  # name[ARGS]{...}, each call after its own [TOOL_CALLS]
            body = skip_ws(text, pos + len(MARKER))
            args = text.find(ARGS, body)
            if args < 0:
                if final or MARKER in text[body:]:
                    raise NotACall(f"{MARKER} without {ARGS}")
                return [*items, PartialCall(None, "")]
            name = text[body:args].strip()
            value = skip_ws(text, args + len(ARGS))
            end = value_end(text, value) if value < len(text) else None
            if end is None:
                partial = text[value:] if text.startswith("{", value) else ""
                return [*items, PartialCall(name, partial)]
            items.append(PartialCall(name, text[value:end], True))
            pos = text.find(MARKER, end)
            if pos < 0:
                return items
            items.append("")
