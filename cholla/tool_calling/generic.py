"""The tool format for chat templates that know nothing of tools (SmolLM2, the ChatML fallback, ...).

As llama.cpp does for such templates: the tools are described in the system prompt,
and the model is asked to answer with calls as JSON in Hermes' ``<tool_call>`` tags
(so ``HermesParser`` reads them back). History is rewritten into plain messages the
template can render: an assistant's calls become that text, and tool results become a
user message of ``<tool_response>`` blocks. The system prompt reads:

    You can call these functions. Their parameters are JSON schemas:
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
    ...

    To call functions, answer with one block per call, each holding a JSON object, and nothing else:
    <tool_call>
    {"name": "<function name>", "arguments": {<the arguments>}}
    </tool_call>
    Each result comes back in a user message, between <tool_response> and </tool_response>.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "You can call these functions. Their parameters are JSON schemas:\n" + lines + "\n\n"
        "To call functions, answer with one block per call, each holding a JSON object, and nothing else:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<the arguments>}}\n</tool_call>\n'
        "Each result comes back in a user message, between <tool_response> and </tool_response>."
    )


def call_text(call: dict[str, Any]) -> str:
    """One call of an assistant message (``{"function": {"name", "arguments"}}``) as the model writes it."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return "<tool_call>\n" + json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def generic_messages(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """``messages`` rewritten for a template without tool support, the tools described in the system prompt."""
    out: list[Message] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [_text(message.get("content"))] if _text(message.get("content")) else []
            parts += [call_text(call) for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            block = "<tool_response>\n" + _text(message.get("content")) + "\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({key: value for key, value in message.items() if key != "tool_calls"})
    for message in out:
        message.pop("_tool_results", None)
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
