"""Calls written as a JSON array of objects (Mistral's ``[TOOL_CALLS][...]``, ``tool_choice: required``)."""

from __future__ import annotations

from cholla.tool_calling.json_scan import scan_object, skip_ws
from cholla.tool_calling.parser import NotACall, PartialCall, json_call


def array_calls(text: str, start: int, argument_keys: tuple[str, ...]) -> tuple[list[PartialCall], int | None]:
    """The calls in the array at ``text[start] == "["``, and the index after ``]`` once it is closed."""
    calls: list[PartialCall] = []
    pos = skip_ws(text, start + 1)
    while pos < len(text):
        if text[pos] == "]" and not calls:
            return calls, pos + 1
        if text[pos] != "{":
            raise NotACall("a call array holds something other than objects")
        obj = scan_object(text, pos)
        calls.append(json_call(obj, text, argument_keys))
        if obj.end is None:
            return calls, None
        pos = skip_ws(text, obj.end)
        if pos >= len(text):
            break
        if text[pos] == "]":
            return calls, pos + 1
        if text[pos] != ",":
            raise NotACall("calls in an array must be separated by commas")
        pos = skip_ws(text, pos + 1)
    return calls, None
