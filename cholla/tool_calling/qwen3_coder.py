"""Qwen3-Coder's XML: ``<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function></tool_call>``.

Values are bare text; the tool's JSON schema says what each one is: a ``string``
parameter stays text, others are read as JSON (numbers, booleans, objects), falling
back to text. A parameter the schema does not name stays text. The arguments JSON is
built one parameter at a time, so a stream sends each parameter once it is closed.
"""

from __future__ import annotations

import json
from typing import Any

from cholla.tool_calling.json_scan import skip_ws
from cholla.tool_calling.parser import Item, NotACall, PartialCall, ToolParser, tagged_calls

START, END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"


def _partial(text: str, at: int, *tags: str) -> bool:
    """Whether the text ends at ``at`` or inside one of ``tags``."""
    rest = text[at:]
    return any(tag.startswith(rest) for tag in tags)


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    markers = (START,)

    def _convert(self, function: str, parameter: str, value: str) -> Any:
        for tool in self.tools:
            spec = tool.get("function", tool)
            if spec.get("name") == function:
                schema = (spec.get("parameters") or {}).get("properties", {}).get(parameter)
                if schema is None or schema.get("type") == "string":
                    return value
                try:
                    return json.loads(value)
                except ValueError:
                    return value
        return value

    def _function(self, text: str, at: int) -> tuple[PartialCall, int | None]:
        """The call at ``text[at:] == "<function=..."``; the index after ``</function>`` once complete."""
        close = text.find(">", at)
        if close < 0:
            return PartialCall(None, ""), None
        name = text[at + len(FUNCTION):close].strip()
        members: list[str] = []
        pos = close + 1
        while True:
            tag = skip_ws(text, pos)
            if text.startswith(PARAMETER, tag):
                key_end = text.find(">", tag)
                value_end = text.find(PARAMETER_END, key_end + 1) if key_end >= 0 else -1
                if value_end < 0:
                    return PartialCall(name, "{" + ", ".join(members)), None
                key = text[tag + len(PARAMETER):key_end].strip()
                value = text[key_end + 1:value_end]
                value = value[1:] if value.startswith("\n") else value
                value = value[:-1] if value.endswith("\n") else value
                encoded = json.dumps(self._convert(name, key, value), ensure_ascii=False)
                members.append(f"{json.dumps(key, ensure_ascii=False)}: {encoded}")
                pos = value_end + len(PARAMETER_END)
            elif text.startswith(FUNCTION_END, tag):
                return PartialCall(name, "{" + ", ".join(members) + "}", True), tag + len(FUNCTION_END)
            elif _partial(text, tag, PARAMETER, FUNCTION_END):
                return PartialCall(name, "{" + ", ".join(members)), None
            else:
                raise NotACall(f"unexpected text inside <function={name}>")

    def items(self, text: str, final: bool) -> list[Item]:
        def function_call(text: str, body: int) -> tuple[Item, int | None]:
            if _partial(text, body, FUNCTION):
                return PartialCall(None, ""), None
            if not text.startswith(FUNCTION, body):
                raise NotACall(f"{START} is not followed by {FUNCTION}")
            return self._function(text, body)

        return tagged_calls(text, START, END, function_call)
