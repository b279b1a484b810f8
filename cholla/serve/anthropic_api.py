"""Anthropic's Messages API: ``/v1/messages`` (and ``/v1/messages/count_tokens``).

``system`` and ``messages`` go through the model's chat template like an OpenAI
chat; the reply is one text block. Fields Anthropic defines but cholla does not
implement (tools, thinking, output formats, ...) are refused with a 400 that names
them. Bookkeeping and routing hints (``metadata``, ``service_tier``, ``cache_control``,
``inference_geo``, ``user_profile_id``, ``workspace_id``) are accepted and ignored:
they do not change the output. ``temperature``, ``top_p`` and ``top_k`` are honoured
when sent (recent SDKs no longer send them; pass them in ``extra_body``).

A final ``assistant`` message is a prefill: the prompt stops inside it, the model
continues it, and the reply holds only the new text.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from cholla.engine.outputs import CompletionOutput, RequestOutput
from cholla.serve.context import Prepared, ServeContext, StrictModel, read_json, validate
from cholla.serve.errors import APIError, error_body
from cholla.serve.streaming import SSEResponse, collect, finished_only, merge, sse

log = logging.getLogger("cholla")

router = APIRouter()

UNSUPPORTED = {
    "tools": "no tool use",
    "tool_choice": "no tool use",
    "thinking": "no extended thinking",
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


class MessagesRequest(StrictModel):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
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


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    """The text of a string or of text blocks; 400 for images, documents, tool blocks."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(400, f"{where}[{j}] is a {block.get('type')!r} block; cholla takes text blocks only")
        texts.append(block["text"])
    return "\n".join(texts)


def template_messages(system: str | list[dict[str, Any]] | None, messages: list[AnthropicMessage]) -> list[dict[str, str]]:
    converted = [{"role": "system", "content": _text(system, "system")}] if system else []
    for i, message in enumerate(messages):
        converted.append({"role": message.role, "content": _text(message.content, f"messages[{i}].content")})
    return converted


def encode(ctx: ServeContext, system: str | list[dict[str, Any]] | None, messages: list[AnthropicMessage]) -> list[int]:
    """The prompt's token ids; a final assistant message is continued, not closed (Anthropic's prefill)."""
    converted = template_messages(system, messages)
    if converted[-1]["role"] == "assistant" and converted[-1]["content"].strip():
        return ctx.encode_chat(converted, add_generation_prompt=False, continue_final_message=True)
    if converted[-1]["role"] == "assistant":  # an empty prefill: an ordinary assistant turn
        converted.pop()
    return ctx.encode_chat(converted)


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


def stop_reason(completion: CompletionOutput) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a finished completion."""
    if completion.finish_reason == "length":
        return "max_tokens", None
    if isinstance(completion.stop_reason, str):
        return "stop_sequence", completion.stop_reason
    return "end_turn", None


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.engine()
    body = validate(MessagesRequest, await read_json(request), UNSUPPORTED)
    model = ctx.check_model(body.model)
    prompt_ids = encode(ctx, body.system, body.messages)
    kwargs = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "stop": body.stop_sequences}
    prepared = ctx.prepare(ctx.new_id("msg_"), [{"prompt": None, "prompt_token_ids": prompt_ids}],
                           {k: v for k, v in kwargs.items() if v is not None}, body.max_tokens)
    stream = merge(prepared.streams(ctx.engine()))
    if body.stream:
        return SSEResponse(_events(ctx, prepared, model, stream), on_close=prepared.admission.release)
    try:
        outputs = await collect(request, finished_only(stream))
    finally:
        prepared.admission.release()
    if outputs is None:  # the client hung up; its request was aborted
        return Response(status_code=499)
    completion = outputs[-1][1].outputs[0]
    reason, sequence = stop_reason(completion)
    counts = usage(ctx, len(prompt_ids), outputs[-1][1], len(completion.token_ids))
    return JSONResponse({
        "id": prepared.request_id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": completion.text}],
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": counts,
    })


async def _events(ctx: ServeContext, prepared: Prepared, model: str,
                  outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    """Anthropic's event sequence: message_start, a text block's start/deltas/stop, message_delta, message_stop.

    message_start waits for the first output: only then does the usage know what the prefix cache served.
    """
    input_tokens = len(prepared.prompts[0]["prompt_token_ids"])
    sent = 0
    try:
        completion = out = None
        async for _, out in outputs:
            if completion is None:
                yield sse({"type": "message_start", "message": {
                    "id": prepared.request_id, "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": None, "stop_sequence": None, "usage": usage(ctx, input_tokens, out, 0),
                }}, event="message_start")
                yield sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                          event="content_block_start")
                yield sse({"type": "ping"}, event="ping")
            completion = out.outputs[0]
            if len(completion.text) > sent:
                yield sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": completion.text[sent:]}}, event="content_block_delta")
                sent = len(completion.text)
        yield sse({"type": "content_block_stop", "index": 0}, event="content_block_stop")
        reason, sequence = stop_reason(completion)
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
    return JSONResponse({"input_tokens": len(encode(ctx, body.system, body.messages))})
