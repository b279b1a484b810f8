"""What a request's ``tools`` and ``tool_choice`` change, for the server and ``LLM.chat`` alike.

- ``none`` (or no tools): nothing; the tools are not shown to the model.
- ``auto``: the template renders the tools; the reply is parsed in the template's format.
- ``required`` / a named function: the template renders the tools and the grammar
  engine forces JSON calls (``schemas.py``), read back by ``forced.py``.

Formats whose markers are special tokens (Llama 3's ``<|python_tag|>``, Mistral's
``[TOOL_CALLS]``) need the reply decoded with them, so the plan asks for
``skip_special_tokens=False`` (unless the request set it) and cuts the end-of-turn
token's text off the finished reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cholla.errors import InvalidRequestError
from cholla.sampling.params import StructuredOutputsParams
from cholla.tokenizer.chat_template import ChatTemplate
from cholla.tool_calling.call import ToolCall
from cholla.tool_calling.chooser import forced_parser, parser_class
from cholla.tool_calling.parser import ToolCallStream, ToolParser
from cholla.tool_calling.schemas import function_spec, named_schema, required_schema

ToolChoice = str | dict[str, Any]


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]] | None = None  # what the template renders
    parser: ToolParser | None = None  # None: the reply is plain text
    structured_outputs: StructuredOutputsParams | None = None
    parallel: bool = True
    end_texts: tuple[str, ...] = ()  # end-of-turn tokens' text, cut off when special tokens are kept

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def sampling_kwargs(self, skip_special_tokens: bool | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.structured_outputs is not None:
            kwargs["structured_outputs"] = self.structured_outputs
        if self.parser is not None and self.parser.needs_special_tokens and skip_special_tokens is None:
            kwargs["skip_special_tokens"] = False
        return kwargs

    def reply_text(self, text: str, finished: bool) -> str:
        if finished and self.parser is not None and self.parser.needs_special_tokens:
            for end in self.end_texts:
                if end and text.endswith(end):
                    return text[: -len(end)]
        return text

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = self.parser.parse(self.reply_text(text, True))
        return content, calls[: self.max_calls]

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.parser, max_calls=self.max_calls)


def plan_tools(template: ChatTemplate, tools: list[dict[str, Any]] | None, tool_choice: ToolChoice | None = None,
               parallel_tool_calls: bool | None = None, end_texts: tuple[str, ...] = ()) -> ToolPlan:
    """The plan for OpenAI-shaped ``tools`` and ``tool_choice``; ``InvalidRequestError`` for a choice that cannot be met."""
    tools = list(tools or []) or None
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise InvalidRequestError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}")
    if tools is None or choice == "none":
        if choice not in ("none", "auto"):
            raise InvalidRequestError("tool_choice needs tools: send the tools the model must call")
        return ToolPlan()
    names = [function_spec(t).get("name") for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tools have duplicate names: {names}")
    parallel = parallel_tool_calls is not False
    if choice == "auto":
        return ToolPlan(tools, parser_class(template.source, template.supports_tools)(tools), None, parallel, end_texts)
    if choice == "required":
        schema = required_schema(tools, parallel)
    else:
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise InvalidRequestError(f"tool_choice names function {name!r}, which is not among the tools {names}")
        schema = named_schema(tools, name)
    return ToolPlan(tools, forced_parser(tools, choice), StructuredOutputsParams(json=schema), parallel, end_texts)
