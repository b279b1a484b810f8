"""OpenAI's API (with vLLM's extra sampling fields): ``/v1/chat/completions`` and ``/v1/completions``.

Request bodies become ``SamplingParams``; engine outputs become OpenAI's responses
and stream chunks. Structured output comes in OpenAI's ``response_format``, vLLM's
``structured_outputs`` / ``guided_*`` and llama.cpp's ``grammar`` / ``json_schema``.
``tools`` / ``tool_choice`` / ``parallel_tool_calls`` follow
``cholla.tool_calling.plan``: calls come back in ``message.tool_calls`` (streamed as
OpenAI's deltas) with ``finish_reason: "tool_calls"``. A field OpenAI defines but
cholla does not implement (audio, ...) is refused with a 400 that names it, never
ignored. Only ``user``, ``metadata``, ``store`` and ``service_tier`` are accepted
and ignored: they ask for bookkeeping, not for different output.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Iterable, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from cholla.engine.outputs import CompletionOutput, PromptLogprob, RequestOutput
from cholla.errors import InvalidRequestError
from cholla.reasoning import effort_template_kwargs
from cholla.sampling.params import StructuredOutputsParams
from cholla.serve.context import (Prepared, Reasoning, ServeContext, StrictModel, compile_off_loop, off_loop,
                                  read_json, validate)
from cholla.serve.errors import APIError, error_body
from cholla.serve.streaming import SSEResponse, collect, finished_only, merge, sse
from cholla.tokenizer.tokenizer import Tokenizer
from cholla.tool_calling.parser import ToolCallStream
from cholla.tool_calling.plan import ToolPlan

log = logging.getLogger("cholla")

router = APIRouter()

# JSON has no -inf; vLLM reports impossible tokens at this floor too.
LOGPROB_FLOOR = -9999.0

UNSUPPORTED_COMMON = {
    "functions": "the deprecated function calling; send 'tools'",
    "function_call": "the deprecated function calling; send 'tool_choice'",
}
UNSUPPORTED_CHAT = {
    **UNSUPPORTED_COMMON,
    "audio": "text output only",
    "prediction": "no predicted outputs",
    "web_search_options": "no web search",
}
UNSUPPORTED_COMPLETIONS = {**UNSUPPORTED_COMMON, "suffix": "no fill-in-the-middle",
                           "tools": "tools need /v1/chat/completions", "tool_choice": "tools need /v1/chat/completions"}


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema


class ResponseFormat(StrictModel):
    type: str
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama.cpp: {"type": "json_object", "schema": ...}


class StructuredOutputsRequest(StrictModel):
    """vLLM's ``structured_outputs`` object."""

    json_: dict[str, Any] | str | bool | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


# Fields that constrain the output, as vLLM's older API and llama.cpp's server spell them.
CONSTRAINT_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                     "guided_grammar": "grammar", "grammar": "grammar", "json_schema": "json"}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def structured_outputs_params(body: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's output constraint, from whichever API's field carries it; 400 when two fields do."""
    found: list[tuple[str, dict[str, Any]]] = []  # (request field, StructuredOutputsParams kwargs)
    fmt = body.response_format
    if fmt is not None and fmt.type not in RESPONSE_FORMAT_TYPES:
        raise APIError(400, f"response_format type {fmt.type!r} is not supported by cholla; use one of "
                            f"{', '.join(RESPONSE_FORMAT_TYPES)} (or structured_outputs for regex, choice or grammar)",
                       param="response_format.type")
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format of type 'json_schema' needs json_schema.schema, the JSON schema "
                                "the output must follow", param="response_format.json_schema")
        found.append(("response_format", {"json": fmt.json_schema.schema_}))
    elif fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json": fmt.schema_} if fmt.schema_ is not None else {"json_object": True}))
    if body.structured_outputs is not None:
        given = body.structured_outputs.model_dump(exclude_none=True)
        found.append(("structured_outputs", {("json" if k == "json_" else k): v for k, v in given.items()}))
    found += [(name, {key: getattr(body, name)}) for name, key in CONSTRAINT_FIELDS.items()
              if getattr(body, name) is not None]
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"'{name}'" for name, _ in found)
        raise APIError(400, f"{names} each constrain the output; send only one of them", param=found[1][0])
    name, kwargs = found[0]
    try:
        return StructuredOutputsParams(**kwargs)
    except InvalidRequestError as e:
        raise APIError(400, f"invalid '{name}': {e}", param=name) from None


class SamplingRequest(StrictModel):
    """Fields both endpoints share. None means "the default" (vLLM's, which are OpenAI's)."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: int | None = None  # vLLM's: top alternatives per prompt token, in vLLM's shape
    speculative_decoding: bool | None = None  # false: this request never speculates (server flag --speculative-method)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Structured output (see structured_outputs_params()): OpenAI's, vLLM's and llama.cpp's spellings.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | bool | None = None
    # Accepted and ignored: bookkeeping fields that do not change the output.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        fields = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "logit_bias",
                  "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "prompt_logprobs",
                  "speculative_decoding")
        kwargs = {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
        constraint = structured_outputs_params(self)
        return {**kwargs, "structured_outputs": constraint} if constraint is not None else kwargs

    def check_stream_options(self) -> bool:
        """Whether the stream ends with a usage chunk."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed with stream=true", param="stream_options")
        return self.stream_options is not None and self.stream_options.include_usage


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCallEntry(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallEntry] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message answers this call
    reasoning_content: str | None = None  # an earlier reply's reasoning, for templates that render it (Qwen 3)
    # What the OpenAI SDK's own assistant messages carry (``message.model_dump()``): accepted, no output changes.
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    modalities: list[Literal["text"]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the prompt ends inside the final message, which the model continues
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class CompletionRequest(SamplingRequest):
    prompt: Any  # a string, strings, token ids or lists of token ids: checked by _completion_prompts
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them; 400 for content that is not text."""
    converted = []
    for i, message in enumerate(messages):
        content = message.content
        if content is None:
            if message.role != "assistant":
                raise APIError(400, f"messages[{i}] ({message.role}) has no content", param=f"messages.{i}.content")
            content = message.refusal or ""  # an assistant that refused said so in 'refusal'
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}] is of type {part.get('type')!r}; cholla takes text "
                                        "parts only ({'type': 'text', 'text': ...})", param=f"messages.{i}.content.{j}")
            content = [{"type": "text", "text": part["text"]} for part in content]
        entry = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.name is not None:
            entry["name"] = message.name
        if message.reasoning_content is not None and message.role == "assistant":
            entry["reasoning_content"] = message.reasoning_content
        if message.tool_calls and message.role == "assistant":
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.role == "tool":
            if message.tool_call_id is None:
                raise APIError(400, f"messages[{i}] (tool) needs the 'tool_call_id' it answers",
                               param=f"messages.{i}.tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        converted.append(entry)
    return converted


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list, num_top: int) -> dict[str, Any]:
    """OpenAI chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**entry(token_id, chosen), "top_logprobs": [entry(i, lp) for i, lp in top[:num_top]]}
        for token_id, (chosen, top) in zip(token_ids, logprobs)
    ]}


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list, offset: int) -> dict[str, Any]:
    """Legacy completions shape: parallel lists of tokens, their logprobs, top-k dicts and text offsets.

    An entry of ``logprobs`` may be None (an echoed prompt's first token): null logprob and top.
    """
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(token_ids, logprobs):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(None if entry is None else _logprob(entry[0]))
        top_logprobs.append(None if entry is None else {_token_text(tokenizer, i): _logprob(lp) for i, lp in entry[1]})
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def vllm_prompt_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[PromptLogprob | None]) -> list:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or ``{id: {logprob, rank, decoded_token}}``
    holding the prompt token itself and the top alternatives (JSON object keys are strings)."""

    def entry(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _logprob(logprob), "rank": rank, "decoded_token": _token_text(tokenizer, token_id)}

    result: list = []
    for token_id, scored in zip(token_ids, entries):
        if scored is None:
            result.append(None)
            continue
        alternatives = {str(i): entry(i, lp, rank) for rank, (i, lp) in enumerate(scored.top, 1)}
        result.append({str(token_id): entry(token_id, scored.logprob, scored.rank), **alternatives})
    return result


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; ``cached_tokens``: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class _Shape:
    """How one endpoint turns a completion (or a piece of one) into a choice."""

    def __init__(self, ctx: ServeContext, chat: bool, logprobs: int | None, echo: list[str] | None = None,
                 prompt_logprobs: int | None = None, tools: ToolPlan | None = None, reasoning: Reasoning | None = None):
        self.tokenizer, self.chat, self.logprobs, self.echo = ctx.tokenizer, chat, logprobs, echo
        self.prompt_logprobs = prompt_logprobs
        self.object = "chat.completion" if chat else "text_completion"
        self.tools = tools if tools is not None and tools.parser is not None else None
        self.tool_streams: dict[int, ToolCallStream] = {}
        # With a reasoning parser, per choice index while streaming: its parser, the answer so far, the newest reasoning.
        self.reasoning, self.reasoning_streams, self.answers, self.new_reasoning = reasoning, {}, {}, {}

    def tool_choice(self, index: int, completion: CompletionOutput, stream: bool) -> dict[str, Any]:
        """A chat choice whose answer (the text after any reasoning) is read for tool calls: the message, or a delta.

        Called after ``choice``, which has taken the reasoning apart.
        """
        if not stream:
            split = self.reasoning.split(completion.text) if self.reasoning else None
            content, calls = self.tools.parse(split.content if split else completion.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if split is not None:
                message["reasoning_content"] = split.reasoning
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
            choice = {"index": index, "message": message}
        else:
            tool_stream = self.tool_streams.setdefault(index, self.tools.stream())
            answer = self.answers.get(index, "") if self.reasoning else completion.text
            text = self.tools.reply_text(answer, completion.finished)
            content, deltas = tool_stream.feed(text, completion.finished)
            delta: dict[str, Any] = {"content": content} if content else {}
            if self.new_reasoning.get(index):
                delta = {"reasoning_content": self.new_reasoning[index], **delta}
            if deltas:
                delta["tool_calls"] = [d.to_openai() for d in deltas]
            calls = tool_stream.calls
            choice = {"index": index, "delta": delta}
        finish = completion.finish_reason
        choice["finish_reason"] = "tool_calls" if calls and finish == "stop" else finish
        choice["stop_reason"] = completion.stop_reason if finish else None
        return choice

    def choice(self, index: int, prompt_index: int, text: str, token_ids: list[int], logprobs: list | None,
               finish: CompletionOutput | None, sent: int | None, prompt_out: RequestOutput | None = None) -> dict[str, Any]:
        """A full response's choice when ``sent`` is None, else a stream chunk's (``sent`` chars already out).

        ``prompt_out``: the output whose scored prompt this choice carries: an echo's prompt
        tokens lead its logprobs (from text offset 0), and vLLM's ``prompt_logprobs`` are added.
        """
        lp = None
        if self.logprobs is not None and logprobs is not None:
            if self.chat:
                lp = chat_logprobs(self.tokenizer, token_ids, logprobs, self.logprobs)
            elif self.echo and prompt_out is not None:
                entries = [None if e is None else (e.logprob, e.top[: self.logprobs]) for e in prompt_out.prompt_logprobs]
                lp = completion_logprobs(self.tokenizer, prompt_out.prompt_token_ids + token_ids, entries + logprobs, 0)
            else:
                offset = len(self.echo[prompt_index]) if self.echo else 0
                lp = completion_logprobs(self.tokenizer, token_ids, logprobs, offset + (sent or 0))
        choice: dict[str, Any] = {"index": index}
        if self.chat and sent is None:
            choice["message"] = {"role": "assistant", **self._reasoning_and_content(text)}
        elif self.chat:
            choice["delta"] = self._delta(index, text, finish is not None)
        else:
            choice["text"] = text
        choice["logprobs"] = lp
        choice["finish_reason"] = finish.finish_reason if finish else None
        choice["stop_reason"] = finish.stop_reason if finish else None
        if not self.chat and self.prompt_logprobs is not None and prompt_out is not None:
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(prompt_out)
        return choice

    def vllm_prompt_logprobs(self, out: RequestOutput) -> list:
        entries = [None if e is None else e._replace(top=e.top[: self.prompt_logprobs]) for e in out.prompt_logprobs]
        return vllm_prompt_logprobs(self.tokenizer, out.prompt_token_ids, entries)

    def _reasoning_and_content(self, text: str) -> dict[str, Any]:
        if self.reasoning is None:
            return {"content": text}
        split = self.reasoning.split(text)
        return {"content": split.content, "reasoning_content": split.reasoning}

    def _delta(self, index: int, text: str, finished: bool) -> dict[str, Any]:
        """A stream chunk's delta: the new answer text, and with a reasoning parser the new reasoning text."""
        if self.reasoning is None:
            return {"content": text} if text else {}
        stream = self.reasoning_streams.setdefault(index, self.reasoning.stream())
        parts = [stream.feed(text), *([stream.finish()] if finished else [])]
        reasoning, content = "".join(p.reasoning or "" for p in parts), "".join(p.content for p in parts)
        self.answers[index], self.new_reasoning[index] = self.answers.get(index, "") + content, reasoning
        return {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": content} if content else {})}


def _prompt_tokens(prepared: Prepared) -> int:
    return sum(len(p["prompt_token_ids"]) for p in prepared.prompts)


async def _respond(request: Request, ctx: ServeContext, prepared: Prepared, shape: _Shape, model: str,
                   include_usage: bool, stream: bool) -> Response:
    engine = ctx.engine()
    n = prepared.params.n
    if stream:
        body = _stream(prepared, shape, model, include_usage, merge(prepared.streams(engine)))
        return SSEResponse(body, on_close=prepared.admission.release)
    try:
        outputs = await collect(request, finished_only(merge(prepared.streams(engine))))
    finally:
        prepared.admission.release()
    if outputs is None:  # the client hung up; its requests were aborted
        return Response(status_code=499)
    final: dict[int, RequestOutput] = {}
    for prompt_index, out in outputs:
        final[prompt_index * n + out.outputs[0].index] = out
    choices = []
    for index in sorted(final):
        out = final[index]
        c = out.outputs[0]
        text = (shape.echo[index // n] if shape.echo else "") + c.text
        choice = shape.choice(index, index // n, text, c.token_ids, c.logprobs, c, None, prompt_out=out)
        if shape.tools is not None:
            choice.update(shape.tool_choice(index, c, stream=False))
        choices.append(choice)
    completion_tokens = sum(len(out.outputs[0].token_ids) for out in final.values())
    response = {
        "id": prepared.request_id, "object": shape.object, "created": prepared.created, "model": model,
        "choices": choices, "usage": usage(_prompt_tokens(prepared), completion_tokens, _cached_tokens(final.values())),
    }
    if shape.chat and shape.prompt_logprobs is not None:  # vLLM puts a chat's prompt logprobs beside its choices
        response["prompt_logprobs"] = shape.vllm_prompt_logprobs(final[min(final)])
    return JSONResponse(response)


def _cached_tokens(outputs: Iterable[RequestOutput]) -> int:
    """Prompt tokens the prefix cache served, counted once per prompt (its first sequence's)."""
    return sum(out.metrics.num_cached_prompt_tokens for out in outputs if out.metrics and out.outputs[0].index == 0)


async def _stream(prepared: Prepared, shape: _Shape, model: str, include_usage: bool,
                  outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    """SSE chunks: choices interleaved by index as tokens come, a usage chunk if asked, then ``[DONE]``.

    A completion's echo (with its prompt logprobs) leads that choice's first chunk, once the prefill has scored it.
    """
    n = prepared.params.n
    num_choices = n * len(prepared.prompts)
    head = {"id": prepared.request_id, "object": f"{shape.object}.chunk" if shape.chat else shape.object,
            "created": prepared.created, "model": model}

    def chunk(choices: list[dict[str, Any]], usage_value: dict | None = None) -> str:
        return sse({**head, "choices": choices, **({"usage": usage_value} if include_usage else {})})

    sent_chars, sent_tokens = [0] * num_choices, [0] * num_choices
    started = [False] * num_choices
    last: dict[int, RequestOutput] = {}
    try:
        if shape.chat:
            for index in range(num_choices):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        async for prompt_index, out in outputs:
            c = out.outputs[0]
            index = prompt_index * n + c.index
            last[index] = out
            # vLLM's prompt_logprobs ride on a completion's first chunk (a chat returns them unstreamed only).
            prompt_out = out if not started[index] and shape.prompt_logprobs is not None and not shape.chat else None
            if not started[index] and shape.echo:
                yield chunk([shape.choice(index, prompt_index, shape.echo[prompt_index], [],
                                          [] if shape.logprobs is not None else None, None, 0, prompt_out=out)])
                prompt_out = None
            started[index] = True
            text, token_ids = c.text[sent_chars[index]:], c.token_ids[sent_tokens[index]:]
            logprobs = c.logprobs[sent_tokens[index]:] if c.logprobs is not None else None
            if not text and not c.finished and not (shape.logprobs is not None and token_ids) and prompt_out is None:
                continue  # a token whose text is held back (a partial character, a possible stop string)
            choice = shape.choice(index, prompt_index, text, token_ids, logprobs, c if c.finished else None,
                                  sent_chars[index], prompt_out=prompt_out)
            if shape.tools is not None:
                choice.update(shape.tool_choice(index, c, stream=True))
                if not choice["delta"] and not c.finished and choice["logprobs"] is None:
                    sent_chars[index], sent_tokens[index] = len(c.text), len(c.token_ids)
                    continue  # text held back by the tool-call parser (a marker may be starting)
            yield chunk([choice])
            sent_chars[index], sent_tokens[index] = len(c.text), len(c.token_ids)
        if include_usage:
            yield chunk([], usage(_prompt_tokens(prepared), sum(sent_tokens), _cached_tokens(last.values())))
        yield sse("[DONE]")
    except Exception as e:  # the engine failed mid-stream: tell the client in the stream's own terms
        log.exception("stream %s failed", prepared.request_id)
        yield sse(error_body(500, f"generation failed: {e}", anthropic=False))
    finally:
        await outputs.aclose()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.engine()
    body = validate(ChatCompletionRequest, await read_json(request), UNSUPPORTED_CHAT)
    model = ctx.check_model(body.model)
    include_usage = body.check_stream_options()
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs logprobs=true", param="top_logprobs")
    if body.top_logprobs is not None and body.top_logprobs < 0:  # the upper bound is the server's --max-logprobs
        raise APIError(400, "'top_logprobs' must be >= 0", param="top_logprobs")
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(400, "'continue_final_message' continues the last message, so it needs "
                            "'add_generation_prompt': false", param="continue_final_message")
    tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    tools = ctx.plan_tools([t.model_dump(exclude_none=True) for t in body.tools or []], tool_choice,
                           body.parallel_tool_calls)
    template_kwargs = {**effort_template_kwargs(body.reasoning_effort), **(body.chat_template_kwargs or {})}
    prompt_ids = await off_loop(ctx.encode_chat, template_messages(body.messages), body.add_generation_prompt,
                                template_kwargs, continue_final_message=body.continue_final_message, tools=tools.tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = body.sampling_kwargs()
    if "structured_outputs" in sampling and tools.structured_outputs is not None:
        raise APIError(400, f"tool_choice {body.tool_choice if isinstance(body.tool_choice, str) else 'naming a function'!s} "
                            "forces JSON calls, and the request also constrains the output; send only one of them",
                       param="tool_choice")
    kwargs = {**sampling, "logprobs": num_top, **tools.sampling_kwargs(body.skip_special_tokens)}
    await compile_off_loop(ctx, kwargs)
    reasoning = ctx.reasoning_for(prompt_ids, kwargs) if body.add_generation_prompt else None
    prepared = ctx.prepare(ctx.new_id("chatcmpl-"), [{"prompt": None, "prompt_token_ids": prompt_ids}],
                           reasoning.sampling_kwargs(kwargs) if reasoning else kwargs, max_tokens)
    shape = _Shape(ctx, True, num_top, prompt_logprobs=body.prompt_logprobs, tools=tools, reasoning=reasoning)
    return await _respond(request, ctx, prepared, shape, model, include_usage, body.stream)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.engine()
    body = validate(CompletionRequest, await read_json(request), UNSUPPORTED_COMPLETIONS)
    model = ctx.check_model(body.model)
    include_usage = body.check_stream_options()
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "'best_of' other than n is not supported by cholla yet; drop it or set it to n",
                       param="best_of")
    # echo with logprobs scores the prompt too (in the prefill), as OpenAI and vLLM do.
    scored = [n for n in (body.prompt_logprobs, body.logprobs if body.echo else None) if n is not None]
    prompts = await off_loop(_completion_prompts, ctx.tokenizer, body.prompt)
    kwargs = {**body.sampling_kwargs(), "logprobs": body.logprobs, "prompt_logprobs": max(scored) if scored else None}
    await compile_off_loop(ctx, kwargs)
    prepared = ctx.prepare(ctx.new_id("cmpl-"), prompts, kwargs, body.max_tokens, prompt_param="prompt")
    echo = [p["prompt"] for p in prompts] if body.echo else None
    shape = _Shape(ctx, False, body.logprobs, echo, body.prompt_logprobs)
    return await _respond(request, ctx, prepared, shape, model, include_usage, body.stream)


def _completion_prompts(tokenizer: Tokenizer, prompt: Any) -> list[dict[str, Any]]:
    """A string, strings, token ids or lists of token ids, as one engine prompt each."""

    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or (is_ids(prompt) and prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or is_ids(p) for p in prompt):
        raise APIError(400, "'prompt' must be a non-empty string, a list of strings, a list of token ids "
                            "or a list of lists of token ids", param="prompt")
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append({"prompt": item, "prompt_token_ids": tokenizer.encode(item)})
        else:
            if any(t < 0 or t >= tokenizer.vocab_size for t in item):
                raise APIError(400, f"prompt token ids must lie in [0, {tokenizer.vocab_size})", param="prompt")
            prompts.append({"prompt": tokenizer.decode(item, skip_special_tokens=False), "prompt_token_ids": list(item)})
    return prompts
