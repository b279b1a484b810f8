"""JSON schemas that force ``tool_choice: required`` and a named function, as vLLM builds them.

``required``: an array of at least one ``{"name", "parameters"}`` object, ``anyOf`` over
the tools (one item when ``parallel_tool_calls`` is false). A named function: its
parameters object. The grammar engine then makes the reply match
(``StructuredOutputsParams(json=schema)``); ``forced.py`` reads it back.
"""

from __future__ import annotations

from typing import Any

EMPTY_OBJECT = {"type": "object", "properties": {}}


def function_spec(tool: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "description", "parameters"}`` of an OpenAI tool (``{"type": "function", "function": {...}}``)."""
    return tool.get("function", tool)


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return function_spec(tool).get("parameters") or EMPTY_OBJECT


def required_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    options = [
        {"properties": {"name": {"type": "string", "enum": [function_spec(t)["name"]]},
                        "parameters": parameters_schema(t)},
         "required": ["name", "parameters"]}
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def named_schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        if function_spec(tool)["name"] == name:
            return parameters_schema(tool)
    raise KeyError(name)
