"""Replies forced by ``tool_choice``: the grammar engine makes them plain JSON.

``required``: an array of ``{"name", "parameters"}`` objects (vLLM's shape); a named
function: that function's arguments object alone. ``schemas.py`` builds the JSON
schemas that force them.
"""

from __future__ import annotations

from cholla.tool_calling.arrays import array_calls
from cholla.tool_calling.json_scan import skip_ws, value_end
from cholla.tool_calling.parser import Item, NotACall, PartialCall, ToolParser


class RequiredParser(ToolParser):
    name = "required"

    def items(self, text: str, final: bool) -> list[Item]:
        start = skip_ws(text, 0)
        if start >= len(text):
            return ["", PartialCall(None, "")]
        if text[start] != "[":
            raise NotACall("the forced reply is not a JSON array")
        calls, end = array_calls(text, start, ("parameters", "arguments"))
        if not calls and end is not None:
            raise NotACall("the forced reply holds no call")
        items: list[Item] = [""]
        for call in calls or [PartialCall(None, "")]:
            items += [call, ""]
        return items[:-1]


class NamedParser(ToolParser):
    name = "named"

    def __init__(self, tools, function: str):
        super().__init__(tools)
        self.function = function

    def items(self, text: str, final: bool) -> list[Item]:
        start = skip_ws(text, 0)
        if start >= len(text):
            return ["", PartialCall(self.function, "")]
        if text[start] != "{":
            raise NotACall("the forced reply is not a JSON object")
        end = value_end(text, start)
        if end is None:
            return ["", PartialCall(self.function, text[start:])]
        return ["", PartialCall(self.function, text[start:end], True)]
