"""Anthropic's Messages API: ``/v1/messages`` (and ``/v1/messages/count_tokens``).

``system`` and ``messages`` go through the model's chat template like an OpenAI
chat; the reply is a text block, then a ``tool_use`` block per call when ``tools``
are given (``tool_choice`` ``auto``, ``any``, ``tool`` and ``none`` map to OpenAI's
``auto``, ``required``, a named function and ``none``). ``tool_use`` and
``tool_result`` blocks in history become the template's tool calls and tool
messages. With a reasoning parser in force, a ``thinking`` block comes first
when the model thought; ``thinking: {type: enabled, budget_tokens}`` (or
``disabled``) sets the template's thinking switch (``enable_thinking``), and past
``budget_tokens`` of open reasoning the reasoning is closed and the model answers.
Fields Anthropic defines but cholla does not implement (output formats, ...) are
refused with a 400 that names them. Bookkeeping and routing hints (``metadata``, ``service_tier``, ``cache_control``,
``inference_geo``, ``user_profile_id``, ``workspace_id``) are accepted and ignored:
they do not change the output. ``temperature``, ``top_p`` and ``top_k`` are honoured
when sent (recent SDKs no longer send them; pass them in ``extra_body``).

A final ``assistant`` message is a prefill: the prompt stops inside it, the model
continues it, and the reply holds only the new text.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from cholla.engine.outputs import CompletionOutput, RequestOutput
from cholla.reasoning import Split
from cholla.serve.context import (Prepared, Reasoning, ServeContext, StrictModel, compile_off_loop, off_loop,
                                  read_json, validate)
from cholla.serve.errors import APIError, error_body
from cholla.serve.streaming import SSEResponse, collect, finished_only, merge, sse
from cholla.tool_calling.call import ToolCall
from cholla.tool_calling.plan import ToolPlan

log = logging.getLogger("cholla")

router = APIRouter()

UNSUPPORTED = {
    "mcp_servers": "no MCP servers",
    "container": "no code execution containers",
    "output_config": "no output configuration",
    "output_format": "no structured output",
    "logprobs": "no logprobs on the Messages API; use /v1/chat/completions",
    "top_logprobs": "no logprobs on the Messages API; use /v1/chat/completions",
}


class AnthropicMessage(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(StrictModel):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None  # accepted and ignored, as elsewhere


class ThinkingConfig(StrictModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None  # how Claude shows it; cholla shows the reasoning as is


class AnthropicToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(StrictModel):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    thinking: ThinkingConfig | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    # Accepted and ignored: bookkeeping fields that do not change the output.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    inference_geo: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class CountTokensRequest(StrictModel):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    thinking: ThinkingConfig | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    """The text of a string or of text blocks (thinking blocks left out); 400 for images, documents, tool blocks."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.get("type") in ("thinking", "redacted_thinking"):
            continue
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(400, f"{where}[{j}] is a {block.get('type')!r} block; cholla takes text blocks only")
        texts.append(block["text"])
    return "\n".join(texts)


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(block.get("tool_use_id"), str):
        raise APIError(400, f"{where} (tool_result) needs the 'tool_use_id' it answers")
    content = block.get("content", "")
    return {"role": "tool", "tool_call_id": block["tool_use_id"],
            "content": _text(content, f"{where}.content") if content else ""}


def _tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
        raise APIError(400, f"{where} (tool_use) needs 'id', 'name' and an 'input' object")
    arguments = json.dumps(block["input"], ensure_ascii=False)
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}


def template_messages(system: str | list[dict[str, Any]] | None, messages: list[AnthropicMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: a user's ``tool_result`` blocks become tool messages
    (before its text), an assistant's ``tool_use`` blocks its ``tool_calls``."""
    converted: list[dict[str, Any]] = [{"role": "system", "content": _text(system, "system")}] if system else []
    for i, message in enumerate(messages):
        where = f"messages[{i}].content"
        if isinstance(message.content, str):
            converted.append({"role": message.role, "content": message.content})
            continue
        text_blocks, results, calls = [], [], []
        for j, block in enumerate(message.content):
            kind = block.get("type")
            if kind == "tool_result" and message.role == "user":
                results.append(_tool_result(block, f"{where}[{j}]"))
            elif kind == "tool_use" and message.role == "assistant":
                calls.append(_tool_use(block, f"{where}[{j}]"))
            else:
                text_blocks.append(block)
        converted.extend(results)
        entry = {"role": message.role, "content": _text(text_blocks, where)}
        thinking = [b["thinking"] for b in text_blocks if b.get("type") == "thinking" and isinstance(b.get("thinking"), str)]
        if thinking:  # templates such as Qwen 3's read it back
            entry["reasoning_content"] = "".join(thinking)
        if calls:
            converted.append({**entry, "tool_calls": calls})
        elif text_blocks or not results:
            converted.append(entry)
    return converted


def encode(ctx: ServeContext, system: str | list[dict[str, Any]] | None, messages: list[AnthropicMessage],
           tools: list[dict[str, Any]] | None = None, thinking: ThinkingConfig | None = None) -> list[int]:
    """The prompt's token ids; a final assistant message is continued, not closed (Anthropic's prefill)."""
    converted = template_messages(system, messages)
    switch = {} if thinking is None else {"enable_thinking": thinking.type != "disabled"}
    last = converted[-1]
    if last["role"] == "assistant" and isinstance(last.get("content"), str) and last["content"].strip() \
            and not last.get("tool_calls"):
        return ctx.encode_chat(converted, add_generation_prompt=False, template_kwargs=switch,
                               continue_final_message=True, tools=tools)
    if last["role"] == "assistant" and not last.get("content") and not last.get("tool_calls"):
        converted.pop()  # an empty prefill: an ordinary assistant turn
    return ctx.encode_chat(converted, template_kwargs=switch, tools=tools)


def usage(ctx: ServeContext, prompt_tokens: int, output: RequestOutput | None, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage: ``input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``
    is the whole prompt. Read: tokens the prefix cache served; creation: the tokens of the prompt's
    full blocks this request computed (what later requests can take from the prefix cache)."""
    cached = output.metrics.num_cached_prompt_tokens if output is not None and output.metrics else 0
    config = ctx.engine().engine.config
    created = 0
    if config.enable_prefix_caching:
        created = max(0, prompt_tokens // config.block_size * config.block_size - cached)
    return {"input_tokens": prompt_tokens - cached - created, "output_tokens": output_tokens,
            "cache_creation_input_tokens": created, "cache_read_input_tokens": cached}


def plan_tools(ctx: ServeContext, tools: list[AnthropicTool] | None, choice: AnthropicToolChoice | None) -> ToolPlan:
    """Anthropic's tools and tool_choice as OpenAI's, for ``cholla.tool_calling.plan``."""
    openai_tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                      "parameters": t.input_schema}} for t in tools or []]
    for tool in openai_tools:
        if tool["function"]["description"] is None:
            del tool["function"]["description"]
    openai_choice: Any = None
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise APIError(400, "tool_choice of type 'tool' needs the tool's 'name'", param="tool_choice.name")
        openai_choice = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
            {"type": "function", "function": {"name": choice.name}}
    parallel = None if choice is None or choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
    return ctx.plan_tools(openai_tools, openai_choice, parallel)


def _tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments_dict}


def stop_reason(completion: CompletionOutput, called: bool = False) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a finished completion (``called``: it made tool calls)."""
    if completion.finish_reason == "length":
        return "max_tokens", None
    if isinstance(completion.stop_reason, str):
        return "stop_sequence", completion.stop_reason
    return ("tool_use" if called else "end_turn"), None


def _thinking_budget(thinking: ThinkingConfig | None, max_tokens: int) -> int | None:
    """The reasoning's token budget (None: none) for a request's ``thinking``."""
    budget = thinking.budget_tokens if thinking is not None and thinking.type != "disabled" else None
    if budget is not None and budget >= max_tokens:
        raise APIError(400, f"thinking.budget_tokens ({budget}) must be less than max_tokens ({max_tokens})",
                       param="thinking.budget_tokens")
    return budget


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.engine()
    body = validate(MessagesRequest, await read_json(request), UNSUPPORTED)
    model = ctx.check_model(body.model)
    tools = plan_tools(ctx, body.tools, body.tool_choice)
    budget = _thinking_budget(body.thinking, body.max_tokens)
    prompt_ids = await off_loop(encode, ctx, body.system, body.messages, tools.tools, body.thinking)
    kwargs = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "stop": body.stop_sequences}
    kwargs = {**{k: v for k, v in kwargs.items() if v is not None}, **tools.sampling_kwargs()}
    await compile_off_loop(ctx, kwargs)  # a forced tool_choice's grammar
    reasoning = ctx.reasoning_for(prompt_ids, kwargs)
    prepared = ctx.prepare(ctx.new_id("msg_"), [{"prompt": None, "prompt_token_ids": prompt_ids}],
                           reasoning.sampling_kwargs(kwargs) if reasoning else kwargs, body.max_tokens)
    if reasoning is not None and budget is not None:
        stream = reasoning.budgeted(ctx.engine(), prepared, budget)
    else:
        stream = merge(prepared.streams(ctx.engine()))
    if body.stream:
        return SSEResponse(_events(ctx, prepared, model, stream, tools, reasoning), on_close=prepared.admission.release)
    try:
        outputs = await collect(request, finished_only(stream))
    finally:
        prepared.admission.release()
    if outputs is None:  # the client hung up; its request was aborted
        return Response(status_code=499)
    completion = outputs[-1][1].outputs[0]
    split = reasoning.split(completion.text) if reasoning else Split(None, completion.text)
    thinking = [{"type": "thinking", "thinking": split.reasoning, "signature": ""}] if split.reasoning else []
    calls: list[ToolCall] = []
    text: str | None = split.content
    if tools.parser is not None:
        text, calls = tools.parse(split.content)
    content = [*thinking, *([{"type": "text", "text": text or ""}] if text or not calls else []),
               *[_tool_use_block(c) for c in calls]]
    reason, sequence = stop_reason(completion, bool(calls))
    counts = usage(ctx, len(prompt_ids), outputs[-1][1], len(completion.token_ids))
    return JSONResponse({
        "id": prepared.request_id, "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": counts,
    })


class _Blocks:
    """The content blocks of a streamed reply, opened and closed as thinking, text and tool calls come."""

    def __init__(self):
        self.index, self.kind = -1, None  # the open block
        self.opened: list[str] = []  # the kinds of every block so far

    def _open(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.close()
        self.index, self.kind = self.index + 1, kind
        self.opened.append(kind)
        return events + [sse({"type": "content_block_start", "index": self.index, "content_block": block},
                             event="content_block_start")]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        events = []
        if self.kind == "thinking":
            events.append(sse({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "signature_delta", "signature": ""}}, event="content_block_delta"))
        self.kind = None
        return [*events, sse({"type": "content_block_stop", "index": self.index}, event="content_block_stop")]

    def thinking(self, text: str) -> list[str]:
        events = [] if self.kind == "thinking" else self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return events + [sse({"type": "content_block_delta", "index": self.index,
                              "delta": {"type": "thinking_delta", "thinking": text}}, event="content_block_delta")]

    def text(self, text: str) -> list[str]:
        events = [] if self.kind == "text" else self._open("text", {"type": "text", "text": ""})
        return events + [sse({"type": "content_block_delta", "index": self.index,
                              "delta": {"type": "text_delta", "text": text}}, event="content_block_delta")]

    def tool_use(self, call_id: str, name: str) -> list[str]:
        return self._open("tool_use", {"type": "tool_use", "id": call_id, "name": name, "input": {}})

    def input_json(self, partial: str) -> list[str]:
        return [sse({"type": "content_block_delta", "index": self.index,
                     "delta": {"type": "input_json_delta", "partial_json": partial}}, event="content_block_delta")]


async def _events(ctx: ServeContext, prepared: Prepared, model: str, outputs: AsyncIterator[tuple[int, RequestOutput]],
                  tools: ToolPlan, reasoning: Reasoning | None) -> AsyncIterator[str]:
    """Anthropic's event sequence: message_start, each block's start/deltas/stop, message_delta, message_stop.

    message_start waits for the first output: only then does the usage know what the prefix cache served.
    """
    input_tokens = len(prepared.prompts[0]["prompt_token_ids"])
    sent, answer = 0, ""  # answer: the reply's text after its reasoning, so far
    blocks = _Blocks()
    tool_stream = tools.stream() if tools.parser is not None else None
    reasoning_stream = reasoning.stream() if reasoning else None
    try:
        completion = out = None
        async for _, out in outputs:
            if completion is None:
                yield sse({"type": "message_start", "message": {
                    "id": prepared.request_id, "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": None, "stop_sequence": None, "usage": usage(ctx, input_tokens, out, 0),
                }}, event="message_start")
                if tool_stream is None and reasoning_stream is None:  # a plain reply opens its text block at once
                    for event in blocks.text("")[:1]:
                        yield event
                yield sse({"type": "ping"}, event="ping")
            completion = out.outputs[0]
            piece, sent = completion.text[sent:], len(completion.text)
            events = []
            if reasoning_stream is not None:
                parts = [reasoning_stream.feed(piece), *([reasoning_stream.finish()] if completion.finished else [])]
                thought = "".join(p.reasoning or "" for p in parts)
                events += blocks.thinking(thought) if thought else []
                piece = "".join(p.content for p in parts)
            answer += piece
            if tool_stream is not None:
                text, deltas = tool_stream.feed(tools.reply_text(answer, completion.finished), completion.finished)
                events += blocks.text(text) if text else []
                for delta in deltas:
                    if delta.id is not None:
                        events += blocks.tool_use(delta.id, delta.name)
                    if delta.arguments:
                        events += blocks.input_json(delta.arguments)
            elif piece:
                events += blocks.text(piece)
            for event in events:
                yield event
        if not {"text", "tool_use"} & set(blocks.opened):
            for event in blocks.text("")[:1]:
                yield event
        for event in blocks.close():
            yield event
        reason, sequence = stop_reason(completion, bool(tool_stream and tool_stream.calls))
        yield sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": usage(ctx, input_tokens, out, len(completion.token_ids))},
                  event="message_delta")
        yield sse({"type": "message_stop"}, event="message_stop")
    except Exception as e:  # the engine failed mid-stream: tell the client in the stream's own terms
        log.exception("stream %s failed", prepared.request_id)
        yield sse(error_body(500, f"generation failed: {e}", anthropic=True), event="error")
    finally:
        await outputs.aclose()


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.engine()
    body = validate(CountTokensRequest, await read_json(request), UNSUPPORTED)
    ctx.check_model(body.model)
    tools = plan_tools(ctx, body.tools, body.tool_choice)
    ids = await off_loop(encode, ctx, body.system, body.messages, tools.tools, body.thinking)
    return JSONResponse({"input_tokens": len(ids)})
