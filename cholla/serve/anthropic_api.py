"""Anthropic's Messages API: ``/v1/messages`` (and ``/v1/messages/count_tokens``).

``system`` and ``messages`` go through the model's chat template like an OpenAI
chat; the reply is a text block, after a ``thinking`` block when a reasoning parser
is in force and the model thought. ``thinking: {type: enabled, budget_tokens}``
(or ``disabled``) sets the template's thinking switch (``enable_thinking``); past
``budget_tokens`` of open reasoning the reasoning is closed and the model answers.
Fields Anthropic defines but cholla does not implement (tools, output formats,
...) are refused with a 400 that names them. Bookkeeping and routing hints (``metadata``, ``service_tier``, ``cache_control``,
``inference_geo``, ``user_profile_id``, ``workspace_id``) are accepted and ignored:
they do not change the output. ``temperature``, ``top_p`` and ``top_k`` are honoured
when sent (recent SDKs no longer send them; pass them in ``extra_body``).
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from cholla.engine.outputs import CompletionOutput, RequestOutput
from cholla.reasoning import Split
from cholla.serve.context import Prepared, Reasoning, ServeContext, StrictModel, read_json, validate
from cholla.serve.errors import APIError, error_body
from cholla.serve.streaming import SSEResponse, collect, finished_only, merge, sse

log = logging.getLogger("cholla")

router = APIRouter()

UNSUPPORTED = {
    "tools": "no tool use",
    "tool_choice": "no tool use",
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


class ThinkingConfig(StrictModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None  # how Claude shows it; cholla shows the reasoning as is


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


def template_messages(system: str | list[dict[str, Any]] | None, messages: list[AnthropicMessage]) -> list[dict[str, str]]:
    converted = [{"role": "system", "content": _text(system, "system")}] if system else []
    for i, message in enumerate(messages):
        entry = {"role": message.role, "content": _text(message.content, f"messages[{i}].content")}
        blocks = message.content if isinstance(message.content, list) else []
        thinking = [b["thinking"] for b in blocks if b.get("type") == "thinking" and isinstance(b.get("thinking"), str)]
        if thinking:  # templates such as Qwen 3's read it back
            entry["reasoning_content"] = "".join(thinking)
        converted.append(entry)
    return converted


def stop_reason(completion: CompletionOutput) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a finished completion."""
    if completion.finish_reason == "length":
        return "max_tokens", None
    if isinstance(completion.stop_reason, str):
        return "stop_sequence", completion.stop_reason
    return "end_turn", None


def _thinking_switch(thinking: ThinkingConfig | None, max_tokens: int) -> tuple[dict[str, Any], int | None]:
    """The template's thinking switch and the reasoning budget (None: no budget) for a request's ``thinking``."""
    if thinking is None:
        return {}, None
    if thinking.type == "disabled":
        return {"enable_thinking": False}, None
    budget = thinking.budget_tokens
    if budget is not None and budget >= max_tokens:
        raise APIError(400, f"thinking.budget_tokens ({budget}) must be less than max_tokens ({max_tokens})",
                       param="thinking.budget_tokens")
    return {"enable_thinking": True}, budget


def _content(text: str, reasoning: Reasoning | None) -> list[dict[str, Any]]:
    """The reply's content blocks: the thinking (when there was any), then the answer."""
    split = reasoning.split(text) if reasoning else None
    thinking = [{"type": "thinking", "thinking": split.reasoning, "signature": ""}] if split and split.reasoning else []
    return [*thinking, {"type": "text", "text": split.content if split else text}]


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.engine()
    body = validate(MessagesRequest, await read_json(request), UNSUPPORTED)
    model = ctx.check_model(body.model)
    template_kwargs, budget = _thinking_switch(body.thinking, body.max_tokens)
    prompt_ids = ctx.encode_chat(template_messages(body.system, body.messages), template_kwargs=template_kwargs)
    reasoning = ctx.reasoning_for(prompt_ids)
    kwargs = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "stop": body.stop_sequences}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    prepared = ctx.prepare(ctx.new_id("msg_"), [{"prompt": None, "prompt_token_ids": prompt_ids}],
                           reasoning.sampling_kwargs(kwargs) if reasoning else kwargs, body.max_tokens)
    if reasoning is not None and budget is not None:
        stream = reasoning.budgeted(ctx.engine(), prepared, budget)
    else:
        stream = merge(prepared.streams(ctx.engine()))
    if body.stream:
        return SSEResponse(_events(prepared, model, stream, reasoning), on_close=prepared.admission.release)
    try:
        outputs = await collect(request, finished_only(stream))
    finally:
        prepared.admission.release()
    if outputs is None:  # the client hung up; its request was aborted
        return Response(status_code=499)
    completion = outputs[-1][1].outputs[0]
    reason, sequence = stop_reason(completion)
    return JSONResponse({
        "id": prepared.request_id, "type": "message", "role": "assistant", "model": model,
        "content": _content(completion.text, reasoning),
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": len(prompt_ids), "output_tokens": len(completion.token_ids)},
    })


class _Blocks:
    """Streamed content blocks, one open at a time: a block starts with its first text and stops when another begins."""

    def __init__(self) -> None:
        self.index, self.kind = -1, None
        self.opened: list[str] = []

    def add(self, kind: str, text: str) -> list[str]:
        events = []
        if kind != self.kind:
            events += self.stop()
            self.index, self.kind = self.index + 1, kind
            self.opened.append(kind)
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
            events.append(sse({"type": "content_block_start", "index": self.index, "content_block": block},
                              event="content_block_start"))
        if text:
            delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta", "text": text}
            events.append(sse({"type": "content_block_delta", "index": self.index, "delta": delta},
                              event="content_block_delta"))
        return events

    def stop(self) -> list[str]:
        if self.kind is None:
            return []
        events = []
        if self.kind == "thinking":
            events.append(sse({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "signature_delta", "signature": ""}}, event="content_block_delta"))
        self.kind = None
        return [*events, sse({"type": "content_block_stop", "index": self.index}, event="content_block_stop")]


async def _events(prepared: Prepared, model: str, outputs: AsyncIterator[tuple[int, RequestOutput]],
                  reasoning: Reasoning | None) -> AsyncIterator[str]:
    """Anthropic's event sequence: message_start, content blocks' start/deltas/stop, message_delta, message_stop."""
    input_tokens = len(prepared.prompts[0]["prompt_token_ids"])
    sent = 0
    blocks = _Blocks()
    reasoning_stream = reasoning.stream() if reasoning else None
    try:
        yield sse({"type": "message_start", "message": {
            "id": prepared.request_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        }}, event="message_start")
        if reasoning_stream is None:  # a text block at once, as Anthropic sends it
            for event in blocks.add("text", ""):
                yield event
        yield sse({"type": "ping"}, event="ping")
        completion = None
        async for _, out in outputs:
            completion = out.outputs[0]
            piece, sent = completion.text[sent:], len(completion.text)
            if reasoning_stream is None:
                parts = [Split(None, piece)]
            else:
                parts = [reasoning_stream.feed(piece), *([reasoning_stream.finish()] if completion.finished else [])]
            for part in parts:
                for event in [*(blocks.add("thinking", part.reasoning) if part.reasoning else []),
                              *(blocks.add("text", part.content) if part.content else [])]:
                    yield event
        for event in [*(blocks.add("text", "") if "text" not in blocks.opened else []), *blocks.stop()]:
            yield event
        reason, sequence = stop_reason(completion)
        yield sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": {"input_tokens": input_tokens, "output_tokens": len(completion.token_ids)}},
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
    template_kwargs = {} if body.thinking is None else {"enable_thinking": body.thinking.type != "disabled"}
    ids = ctx.encode_chat(template_messages(body.system, body.messages), template_kwargs=template_kwargs)
    return JSONResponse({"input_tokens": len(ids)})
