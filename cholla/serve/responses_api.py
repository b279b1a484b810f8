"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

What the OpenAI SDK (``client.responses.create``), openai-agents' default model and
LangChain's ``use_responses_api=True`` send. ``instructions`` and ``input`` (a string,
or items: messages with text parts, ``reasoning``, ``function_call`` and
``function_call_output`` items) become a chat conversation (assistant tool calls,
tool messages) rendered by the model's own template with the function ``tools``,
as on ``/v1/chat/completions`` (``cholla.tool_calling``); the reply is a list of
output items (a ``reasoning`` item when a reasoning parser is in force, a
``message``, a ``function_call`` per call), streamed as OpenAI's typed events,
each with its ``sequence_number``. ``text.format`` ``json_schema`` /
``json_object`` constrain the answer with the grammar engine.

``store`` (default true) keeps each response, with the conversation that led to it,
in a bounded in-memory store (the ``--max-stored-responses`` most recently used),
so a later request can continue it with
``previous_response_id``; an unknown or evicted id is a 404. Fields the API defines
but cholla does not implement are refused with a 400 that names them; unknown
fields too.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from cholla.engine.outputs import CompletionOutput, RequestOutput
from cholla.errors import ChollaError, InvalidRequestError
from cholla.reasoning import effort_template_kwargs
from cholla.sampling.params import StructuredOutputsParams
from cholla.serve.context import (Prepared, Reasoning, ServeContext, StrictModel, compile_off_loop, off_loop,
                                  read_json, validate)
from cholla.serve.errors import APIError, error_body
from cholla.serve.streaming import SSEResponse, collect, finished_only, merge, sse
from cholla.tool_calling.call import ToolCall
from cholla.tool_calling.plan import ToolPlan

log = logging.getLogger("cholla")

router = APIRouter()

UNSUPPORTED = {
    "conversation": "no Conversations API; continue a conversation with previous_response_id",
    "prompt": "no stored prompt templates",
    "context_management": "no context management",
    "top_logprobs": "no logprobs on the Responses API; use /v1/chat/completions",
    "max_tool_calls": "no limit on tool calls",
}


class TextFormat(StrictModel):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint for OpenAI's models; no effect here


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(StrictModel):
    type: Literal["function"]
    name: str


class ReasoningConfig(StrictModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(StrictModel):
    include_obfuscation: bool | None = None  # OpenAI pads its events against side channels; nothing to pad here


class ResponsesRequest(StrictModel):
    model: str | None = None
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    # Accepted and ignored: bookkeeping fields that do not change the output.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None


# -- the store ---------------------------------------------------------------------------------


@dataclass
class StoredResponse:
    """A finished response: its JSON, and the conversation after it (without the instructions)."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    """The ``capacity`` most recently used responses; the least recently used one goes first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ChollaError(f"--max-stored-responses must be at least 1 (the store keeps that many responses), "
                              f"got {capacity}")
        self.capacity = capacity
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self.capacity:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        """The stored response; 404 in OpenAI's shape when it is unknown, was not stored or was evicted."""
        stored = self._responses.get(response_id)
        if stored is None:
            raise APIError(404, f"response {response_id!r} not found: it was never stored here (store=false), was "
                                f"deleted, or is older than the {self.capacity} most recent ones this server keeps",
                           code="response_not_found")
        self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._responses[response_id]


# -- input items -> chat messages ------------------------------------------------------------------


def _text_parts(content: Any, where: str) -> str:
    """The text of a message's content: a string, or ``input_text`` / ``output_text`` parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}] is of type {kind!r}; cholla takes text parts only "
                                "({'type': 'input_text', 'text': ...})", param=f"{where}.{j}")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for the template from the request's ``input``.

    A ``reasoning`` item's text goes to the next assistant message's ``reasoning_content``
    (templates such as Qwen 3's render it back).
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer, got {role!r}",
                               param=f"{where}.role")
            message = {"role": "system" if role == "developer" else role,
                       "content": _text_parts(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "reasoning":
            parts = [*(item.get("content") or []), *(item.get("summary") or [])]
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        elif kind == "function_call":
            call = _function_call(item, where)
            previous = messages[-1] if messages else None
            if previous is not None and previous["role"] == "assistant" and reasoning is None:
                previous.setdefault("tool_calls", []).append(call)  # parallel calls join one assistant turn
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning is not None:
                    message["reasoning_content"], reasoning = reasoning, None
                messages.append(message)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where} (function_call_output) needs the 'call_id' it answers", param=where)
            output = item.get("output", "")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_parts(output, f"{where}.output")})
        else:
            raise APIError(400, f"{where} is of type {kind!r}; cholla takes message, reasoning, function_call and "
                                "function_call_output items (and text parts only)", param=where)
    return messages


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call`` item as a chat template's tool call."""
    if not all(isinstance(item.get(key), str) for key in ("call_id", "name", "arguments")):
        raise APIError(400, f"{where} (function_call) needs 'call_id', 'name' and 'arguments' (JSON text)", param=where)
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat message that continues its conversation."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "reasoning":
            message["reasoning_content"] = "".join(part["text"] for part in item["content"])
        elif item["type"] == "message":
            message["content"] += "".join(part["text"] for part in item["content"])
        elif item["type"] == "function_call":
            message.setdefault("tool_calls", []).append(_function_call(item, "output"))
    return [message]


# -- output items ----------------------------------------------------------------------------------


@dataclass
class _Turn:
    """One response being made: what the request asked, and the output items as they finish."""

    ctx: ServeContext
    body: ResponsesRequest
    model: str
    prepared: Prepared
    conversation: list[dict[str, Any]]
    reasoning: Reasoning | None
    tools: ToolPlan
    output: list[dict[str, Any]] = field(default_factory=list)
    cached_tokens: int = 0

    @property
    def id(self) -> str:
        return self.prepared.request_id

    def response(self, status: str, completion: CompletionOutput | None = None) -> dict[str, Any]:
        """The response object: ``in_progress`` while streaming, then ``completed`` or ``incomplete``."""
        body = self.body
        params = self.prepared.params
        finished = status != "in_progress"
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.prepared.created, "status": status,
            "completed_at": int(time.time()) if finished else None, "error": None, "incomplete_details": incomplete,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": list(self.output), "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store, "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": text_format}, "tool_choice": _tool_choice(body),
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "truncation": body.truncation or "disabled", "user": body.user, "metadata": body.metadata or {},
            "usage": self.usage(completion) if completion is not None and finished else None,
        }

    def usage(self, completion: CompletionOutput) -> dict[str, Any]:
        prompt_tokens = len(self.prepared.prompts[0]["prompt_token_ids"])
        output_tokens = len(completion.token_ids)
        reasoning_text = "".join(part["text"] for item in self.output if item["type"] == "reasoning"
                                 for part in item["content"])
        reasoning_tokens = len(self.ctx.tokenizer.encode(reasoning_text, add_special_tokens=False)) if reasoning_text else 0
        return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, output_tokens)},
                "total_tokens": prompt_tokens + output_tokens}

    def add_answer(self, text: str, status: str) -> None:
        """The non-streamed answer (the text after any reasoning): a message, then a function_call item per call."""
        calls: list[ToolCall] = []
        if self.tools.parser is not None:
            text, calls = self.tools.parse(text)
        if text or not calls:
            self.output.append(_message_item(self.ctx.new_id("msg_"), text or "", status))
        self.output.extend(_function_call_item(self.ctx.new_id("fc_"), call, call.arguments) for call in calls)

    def finish(self, completion: CompletionOutput, store: ResponseStore) -> dict[str, Any]:
        """The final response object; stored when the request asked for it."""
        response = self.response("incomplete" if completion.finish_reason == "length" else "completed", completion)
        if self.body.store:
            store.put(self.id, StoredResponse(response, self.conversation + output_messages(self.output)))
        return response


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if status != "in_progress" else [], "status": status}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [_text_part(text)] if status != "in_progress" else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _function_call_item(item_id: str, call: ToolCall, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name, "arguments": arguments,
            "status": status}


def _tool_choice(body: ResponsesRequest) -> str | dict[str, Any]:
    choice = body.tool_choice or "auto"
    return choice if isinstance(choice, str) else choice.model_dump()


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


# -- the routes ------------------------------------------------------------------------------------


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


def _sampling_kwargs(body: ResponsesRequest, tools: ToolPlan) -> dict[str, Any]:
    kwargs = {"temperature": body.temperature, "top_p": body.top_p}
    kwargs = {**{name: value for name, value in kwargs.items() if value is not None}, **tools.sampling_kwargs()}
    text_format = body.text.format if body.text else None
    if text_format is not None and text_format.type != "text":
        if "structured_outputs" in kwargs:
            raise APIError(400, "text.format cannot be combined with tool_choice 'required' or a named function "
                                "(both constrain the reply); drop one of them", param="text.format")
        if text_format.type == "json_schema" and text_format.json_schema is None:
            raise APIError(400, "text.format of type 'json_schema' needs its 'schema'", param="text.format.schema")
        kwargs["structured_outputs"] = StructuredOutputsParams(json=text_format.json_schema) \
            if text_format.type == "json_schema" else StructuredOutputsParams(json_object=True)
    return kwargs


def _plan_tools(ctx: ServeContext, body: ResponsesRequest) -> ToolPlan:
    """The Responses API's flat function tools and tool_choice as the chat API's, for ``cholla.tool_calling.plan``."""
    tools = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
             for tool in body.tools or []]
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    return ctx.plan_tools(tools, choice, body.parallel_tool_calls)


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.engine()
    data = await read_json(request)
    body = validate(ResponsesRequest, data, UNSUPPORTED)
    model = ctx.check_model(body.model)
    if body.background:
        raise APIError(400, "'background' is not supported by cholla; send the request and wait (or stream)",
                       param="background")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with stream=true", param="stream_options")
    unknown_includes = [name for name in body.include or [] if name != "reasoning.encrypted_content"]
    if unknown_includes:
        raise APIError(400, f"include {unknown_includes[0]!r} is not supported by cholla", param="include")
    store = _store(request)
    history = store.get(body.previous_response_id).conversation if body.previous_response_id else []
    conversation = history + input_messages(body.input)
    if not conversation:
        raise APIError(400, "'input' is empty and there is no previous_response_id to continue", param="input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    effort = body.reasoning.effort if body.reasoning else None
    tools = _plan_tools(ctx, body)
    prompt_ids = await off_loop(ctx.encode_chat, system + conversation, template_kwargs=effort_template_kwargs(effort),
                                tools=tools.tools)
    kwargs = _sampling_kwargs(body, tools)
    reasoning = ctx.reasoning_for(prompt_ids, kwargs)
    try:
        await compile_off_loop(ctx, kwargs)
    except InvalidRequestError as e:  # name the constraint as this API spells it
        field = "tools" if tools.structured_outputs is not None else "text.format.schema"
        raise APIError(400, f"{field}: {e}", param=field) from None
    prepared = ctx.prepare(ctx.new_id("resp_"), [{"prompt": None, "prompt_token_ids": prompt_ids}],
                           reasoning.sampling_kwargs(kwargs) if reasoning else kwargs, body.max_output_tokens,
                           prompt_param="input")
    turn = _Turn(ctx, body, model, prepared, conversation, reasoning, tools)
    outputs = merge(prepared.streams(ctx.engine()))
    if body.stream:
        return SSEResponse(_events(turn, store, outputs), on_close=prepared.admission.release)
    try:
        finished = await collect(request, finished_only(outputs))
    finally:
        prepared.admission.release()
    if finished is None:  # the client hung up; its request was aborted
        return Response(status_code=499)
    out = finished[-1][1]
    completion = out.outputs[0]
    turn.cached_tokens = out.metrics.num_cached_prompt_tokens if out.metrics else 0
    split = reasoning.split(completion.text) if reasoning else None
    if split is not None and split.reasoning is not None:
        turn.output.append(_reasoning_item(ctx.new_id("rs_"), split.reasoning))
    turn.add_answer(split.content if split else completion.text,
                    "incomplete" if completion.finish_reason == "length" else "completed")
    return JSONResponse(turn.finish(completion, store))


async def _events(turn: _Turn, store: ResponseStore, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    """The typed event stream: created, in_progress, each output item's added / deltas / done, then completed."""
    numbers = itertools.count()
    ctx = turn.ctx
    # The item being written: its kind ("reasoning", "message" or "function_call"), id, text so far and call.
    current: dict[str, Any] = {}

    def event(kind: str, **fields: Any) -> str:
        return sse({"type": kind, "sequence_number": next(numbers), **fields}, event=kind)

    def close(status: str = "completed") -> list[str]:
        if not current:
            return []
        kind, item_id, text, call = current["kind"], current["id"], current["text"], current["call"]
        index = len(turn.output)
        where = {"item_id": item_id, "output_index": index}
        current.clear()
        if kind == "function_call":
            item = _function_call_item(item_id, call, text)
            events = [event("response.function_call_arguments.done", **where, name=call.name, arguments=text)]
        elif kind == "reasoning":
            item = _reasoning_item(item_id, text, status)
            events = [event("response.reasoning_text.done", **where, content_index=0, text=text),
                      event("response.content_part.done", **where, content_index=0, part=item["content"][0])]
        else:
            item = _message_item(item_id, text, status)
            events = [event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                      event("response.content_part.done", **where, content_index=0, part=item["content"][0])]
        turn.output.append(item)
        return [*events, event("response.output_item.done", output_index=index, item=item)]

    def open_item(kind: str, call: ToolCall | None = None) -> list[str]:
        events = close()
        index = len(turn.output)
        item_id = ctx.new_id({"reasoning": "rs_", "message": "msg_", "function_call": "fc_"}[kind])
        current.update(kind=kind, id=item_id, text="", call=call)
        if kind == "function_call":
            return [*events, event("response.output_item.added", output_index=index,
                                   item=_function_call_item(item_id, call, "", "in_progress"))]
        if kind == "reasoning":
            item, part = _reasoning_item(item_id, "", "in_progress"), {"type": "reasoning_text", "text": ""}
        else:
            item, part = _message_item(item_id, "", "in_progress"), _text_part("")
        return [*events, event("response.output_item.added", output_index=index, item=item),
                event("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=part)]

    def add(kind: str, delta: str, call: ToolCall | None = None) -> list[str]:
        """``delta`` appended to the current item, opening one of ``kind`` first (always, for a new call)."""
        events = open_item(kind, call) if current.get("kind") != kind or call is not None else []
        if delta:
            current["text"] += delta
            where = {"item_id": current["id"], "output_index": len(turn.output), "delta": delta}
            if kind == "function_call":
                events.append(event("response.function_call_arguments.delta", **where))
            elif kind == "reasoning":
                events.append(event("response.reasoning_text.delta", **where, content_index=0))
            else:
                events.append(event("response.output_text.delta", **where, content_index=0, logprobs=[]))
        return events

    reasoning_stream = turn.reasoning.stream() if turn.reasoning else None
    tool_stream = turn.tools.stream() if turn.tools.parser is not None else None
    sent, answer = 0, ""  # answer: the text after the reasoning, so far
    completion = None
    try:
        yield event("response.created", response=turn.response("in_progress"))
        yield event("response.in_progress", response=turn.response("in_progress"))
        async for _, out in outputs:
            completion = out.outputs[0]
            piece, sent = completion.text[sent:], len(completion.text)
            if out.metrics is not None:
                turn.cached_tokens = out.metrics.num_cached_prompt_tokens
            events = []
            if reasoning_stream is not None:
                parts = [reasoning_stream.feed(piece), *([reasoning_stream.finish()] if completion.finished else [])]
                thought = "".join(p.reasoning or "" for p in parts)
                events += add("reasoning", thought) if thought else []
                piece = "".join(p.content for p in parts)
            if tool_stream is not None:
                answer += piece
                text, deltas = tool_stream.feed(turn.tools.reply_text(answer, completion.finished), completion.finished)
                events += add("message", text) if text else []
                for delta in deltas:
                    call = ToolCall(delta.id, delta.name, "") if delta.id is not None else None
                    events += add("function_call", delta.arguments, call)
            elif piece:
                events += add("message", piece)
            for chunk in events:
                yield chunk
        answered = current.get("kind") in ("message", "function_call") or \
            any(item["type"] in ("message", "function_call") for item in turn.output)
        status = "incomplete" if completion.finish_reason == "length" else "completed"
        for chunk in [*(add("message", "") if not answered else []), *close(status)]:
            yield chunk
        response = turn.finish(completion, store)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield event(kind, response=response)
    except Exception as e:  # the engine failed mid-stream: tell the client in the stream's own terms
        log.exception("stream %s failed", turn.id)
        yield event("error", **error_body(500, f"generation failed: {e}", anthropic=False)["error"])
    finally:
        await outputs.aclose()


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> JSONResponse:
    return JSONResponse(_store(request).get(response_id).body)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> JSONResponse:
    _store(request).delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
