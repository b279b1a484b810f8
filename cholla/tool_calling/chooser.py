"""Pick the tool-call format from the chat template, as llama.cpp (``common/chat.cpp``) and vLLM do.

A template that writes tool calls shows its format in its text: the marker strings
it emits are looked for, most specific first. A template without tool support gets
the generic format (``generic.py``), whose calls are Hermes blocks.
"""

from __future__ import annotations

from typing import Any

from cholla.tool_calling.forced import NamedParser, RequiredParser
from cholla.tool_calling.hermes import HermesParser
from cholla.tool_calling.llama3 import PYTHON_TAG, Llama3JsonParser
from cholla.tool_calling.mistral import MARKER, MistralParser
from cholla.tool_calling.parser import ToolParser
from cholla.tool_calling.qwen3_coder import Qwen3CoderParser

PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Qwen3CoderParser, MistralParser, Llama3JsonParser)
}


def parser_class(template_source: str | None, supports_tools: bool) -> type[ToolParser]:
    """The format a template's model writes calls in; Hermes for templates without tool support."""
    source = template_source or ""
    if not supports_tools:
        return HermesParser
    if "<function=" in source and "<parameter=" in source:
        return Qwen3CoderParser
    if "<tool_call>" in source:
        return HermesParser
    if MARKER in source:
        return MistralParser
    if PYTHON_TAG in source or ('"parameters"' in source and "<|start_header_id|>" in source):
        return Llama3JsonParser
    return HermesParser


def forced_parser(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any]) -> ToolParser:
    """The parser for a grammar-forced reply: ``"required"`` or ``{"function": {"name": ...}}``."""
    if tool_choice == "required":
        return RequiredParser(tools)
    return NamedParser(tools, tool_choice["function"]["name"])
