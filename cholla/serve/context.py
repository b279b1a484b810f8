"""What every route needs: the settings, the engine host, the model's tokenizer and chat template.

Also the steps both APIs share: check the model name, encode a conversation, fit
``max_tokens`` into the context and run the engine's own validation before a
response starts, so every client mistake is a 400 and never a broken stream.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from cholla.engine.async_engine import AsyncLLMEngine
from cholla.engine.outputs import RequestOutput
from cholla.errors import ChollaError, InvalidRequestError
from cholla.reasoning import HarmonyStream, ReasoningParser, Split, ThinkStream, choose_parser
from cholla.sampling.params import SamplingParams
from cholla.serve.errors import APIError
from cholla.serve.host import Admission, EngineHost
from cholla.serve.limits import RequestLimits, parse_body
from cholla.serve.streaming import merge
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat
from cholla.tokenizer.tokenizer import Tokenizer
from cholla.tool_calling.plan import ToolChoice, ToolPlan, plan_tools

log = logging.getLogger("cholla")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_queue: int = 1024
    # CORS (vLLM's flags), off unless origins are given: ["*"] or a list of origins.
    allowed_origins: list[str] | None = None
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    limits: RequestLimits = field(default_factory=RequestLimits)
    reasoning_parser: str = "auto"  # a parser name, "auto" (from the chat template) or "none"
    max_stored_responses: int = 1000  # the Responses API's store for previous_response_id (least recently used out)


@dataclass
class Prepared:
    """A validated request, ready to stream: one entry per prompt, the params, the bound it holds."""

    request_id: str
    prompts: list[dict[str, Any]]  # {"prompt": text or None, "prompt_token_ids": [...]}
    params: SamplingParams
    admission: Admission
    created: int = field(default_factory=lambda: int(time.time()))

    def streams(self, engine: AsyncLLMEngine) -> list[AsyncIterator[RequestOutput]]:
        ids = [self.request_id] if len(self.prompts) == 1 else [f"{self.request_id}-{i}" for i in range(len(self.prompts))]
        return [engine.generate(prompt, self.params, request_id) for prompt, request_id in zip(self.prompts, ids)]


@dataclass
class Reasoning:
    """A request's reasoning parser, whether its prompt opened the reasoning, and whether to keep special tokens."""

    parser: ReasoningParser
    starts_in_reasoning: bool
    keep_special_tokens: bool

    def split(self, text: str) -> Split:
        return self.parser.split(text, self.starts_in_reasoning)

    def stream(self) -> ThinkStream | HarmonyStream:
        return self.parser.stream(self.starts_in_reasoning)

    async def budgeted(self, engine: AsyncLLMEngine, prepared: Prepared, budget: int) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``prepared``'s one sequence with its reasoning cut at ``budget`` tokens, as ``merge`` yields it.

        The first ``budget`` tokens are generated as asked; if the reasoning is still open
        then, the parser's closing text is appended and a second request (its prefix served
        from the cache) answers with the rest of ``max_tokens``. Outputs hold the whole text.
        """
        params, prompt = prepared.params, prepared.prompts[0]
        if params.max_tokens is None or budget >= params.max_tokens:
            async for item in merge(prepared.streams(engine)):
                yield item
            return
        first = engine.generate(prompt, replace(params, max_tokens=budget, min_tokens=0), prepared.request_id)
        try:
            async for out in first:
                if out.finished and out.outputs[0].finish_reason == "length":
                    break
                yield 0, out
            else:
                return
        finally:
            await first.aclose()
        thought = out.outputs[0]
        stream = self.stream()
        stream.feed(thought.text)
        close = self.parser.close if stream.in_reasoning else ""
        close_ids = engine.engine.tokenizer.encode(close, add_special_tokens=False) if close else []
        remaining = params.max_tokens - len(thought.token_ids) - len(close_ids)
        if remaining < 1:
            yield 0, out
            return
        answer_prompt = {"prompt": None, "prompt_token_ids": prompt["prompt_token_ids"] + thought.token_ids + close_ids}
        second = engine.generate(answer_prompt, replace(params, max_tokens=remaining), f"{prepared.request_id}-answer")
        try:
            async for answer in second:
                part = answer.outputs[0]
                whole = replace(part, text=thought.text + close + part.text, token_ids=thought.token_ids + close_ids + part.token_ids,
                                logprobs=None)
                yield 0, replace(answer, request_id=prepared.request_id, prompt_token_ids=out.prompt_token_ids, outputs=[whole],
                                 metrics=out.metrics)
        finally:
            await second.aclose()

    def sampling_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with special tokens kept in the text when the markers need them (unless the request chose)."""
        if self.keep_special_tokens and kwargs.get("skip_special_tokens") is None:
            return {**kwargs, "skip_special_tokens": False}
        return kwargs


class ServeContext:
    def __init__(self, settings: ServerSettings, host: EngineHost):
        self.settings, self.host = settings, host
        self._chat_template: ChatTemplate | None = None
        self._reasoning_parser: tuple[ReasoningParser | None] | None = None

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def engine(self) -> AsyncLLMEngine:
        return self.host.require()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine().engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine().engine.max_model_len

    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            self._chat_template = ChatTemplate.for_tokenizer(self.tokenizer)
        return self._chat_template

    @property
    def reasoning_parser(self) -> ReasoningParser | None:
        """The ``--reasoning-parser`` in force (``auto`` resolved from the chat template), or None."""
        if self._reasoning_parser is None:
            template = self.chat_template
            parser = choose_parser(self.settings.reasoning_parser, None if template.is_fallback else template.source)
            log.info("reasoning parser: %s", parser.name if parser else "none")
            self._reasoning_parser = (parser,)
        return self._reasoning_parser[0]

    def reasoning_for(self, prompt_ids: list[int], sampling_kwargs: dict[str, Any]) -> Reasoning | None:
        """How to read a chat completion of this prompt, when a reasoning parser is in force.

        None for a constrained reply (structured output, forced tool calls): the grammar
        covers the whole reply, which has no room for reasoning.
        """
        parser = self.reasoning_parser
        if parser is None or sampling_kwargs.get("structured_outputs") is not None:
            return None
        tail = self.tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)
        # Markers that are special tokens must stay in the text (GPT-OSS's <|channel|>, ...).
        ids = [self.tokenizer.token_to_id(marker) for marker in parser.markers]
        keep_special = any(i is not None and self.tokenizer.is_special(i) for i in ids)
        return Reasoning(parser, parser.starts_in_reasoning(tail), keep_special)

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if name is None:
            return self.model_name
        if name not in self.settings.served_model_names:
            served = ", ".join(repr(n) for n in self.settings.served_model_names)
            raise APIError(404, f"model {name!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return name

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{uuid.uuid4().hex[:24]}"

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None, continue_final_message: bool = False,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        kwargs = dict(template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools
        return encode_chat(self.tokenizer, self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, **kwargs)

    def plan_tools(self, tools: list[dict[str, Any]] | None, tool_choice: ToolChoice | None,
                   parallel_tool_calls: bool | None = None) -> ToolPlan:
        """What the request's tools change (``cholla.tool_calling.plan``); 400 for a choice that cannot be met."""
        end_texts = tuple(self.tokenizer.decode([i], skip_special_tokens=False) for i in sorted(self.tokenizer.eog_token_ids))
        try:
            return plan_tools(self.chat_template, tools, tool_choice, parallel_tool_calls, end_texts)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None

    def prepare(self, request_id: str, prompts: list[dict[str, Any]], params_kwargs: dict[str, Any],
                max_tokens: int | None, prompt_param: str = "messages") -> Prepared:
        """Fit ``max_tokens`` to the context (the rest of it when None), validate, and admit.

        Raises ``APIError`` (400, or 503 when the server is full) before any response starts.
        """
        engine = self.engine()
        limit = self.max_model_len
        longest = max(len(p["prompt_token_ids"]) for p in prompts)
        if longest >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{longest} tokens; shorten the prompt", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - longest
        elif isinstance(max_tokens, int) and longest + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but {longest} prompt tokens "
                                f"+ max_tokens={max_tokens} = {longest + max_tokens}; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        try:
            params = SamplingParams(max_tokens=max_tokens, **params_kwargs)
            for prompt in prompts:
                engine.engine.check_prompt(prompt["prompt_token_ids"], params)
        except ChollaError as e:  # SamplingParams names the field first: "temperature must be ..."
            field = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=field if field in {*params_kwargs, "max_tokens"} else None) from None
        self._check_limits(params)
        num_seqs = params.n * len(prompts)
        if num_seqs > self.host.max_in_flight:
            raise APIError(400, f"the request asks for {num_seqs} sequences but the server holds at most "
                                f"{self.host.max_in_flight} at once; lower n or send fewer prompts", param="n")
        return Prepared(request_id, prompts, params, self.host.admit(num_seqs))

    def _check_limits(self, params: SamplingParams) -> None:
        """The server's bounds on what one request may ask for (``RequestLimits``), for every route."""
        limits = self.settings.limits
        if params.n > limits.max_n:
            raise APIError(400, f"n={params.n} is more than this server's limit of {limits.max_n} (--max-n)", param="n")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limits.max_logprobs:
                raise APIError(400, f"{name}={value} asks for more top alternatives than this server's limit of "
                                    f"{limits.max_logprobs} (--max-logprobs)", param=name)
        if len(params.stop) > limits.max_stop:
            raise APIError(400, f"{len(params.stop)} stop strings are more than this server's limit of "
                                f"{limits.max_stop} (--max-stop)", param="stop")
        longest = max((len(s) for s in params.stop), default=0)
        if longest > limits.max_stop_length:
            raise APIError(400, f"a stop string of {longest} characters is longer than this server's limit of "
                                f"{limits.max_stop_length} (--max-stop-length)", param="stop")


# Bodies parsed at once: a parse briefly holds about seven times its body in Python objects
# (57 MiB for 8 MiB of token ids), so a flood of large bodies waits here instead of taking gigabytes.
PARSE_CONCURRENCY = 4


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a checked JSON object (``limits.parse_body``); never a traceback.

    415 unless the body is declared ``application/json`` (a form or ``text/plain``
    body is what a cross-site page can send without a CORS preflight); 413 when
    ``Content-Length`` or the bytes actually received pass ``max_body_bytes``,
    before any parsing. The parse runs on a worker thread, ``PARSE_CONCURRENCY`` at a time.
    """
    limits: RequestLimits = request.app.state.ctx.settings.limits
    media_type, *options = [part.strip().lower() for part in request.headers.get("content-type", "").split(";")]
    charset = next((o.split("=", 1)[1].strip('"') for o in options if o.startswith("charset=")), "utf-8")
    if media_type != "application/json" or charset not in ("utf-8", "utf8"):
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                            f"{request.headers.get('content-type', 'none')!r})")
    too_large = APIError(413, f"the request body is larger than this server's limit of {limits.max_body_bytes} bytes "
                              "(--max-body-size); send a smaller request")
    declared = request.headers.get("content-length", "0")
    if not (declared.isascii() and declared.isdigit()):
        raise APIError(400, f"Content-Length {declared[:40]!r} is not a number")
    if len(declared) > 18 or int(declared) > limits.max_body_bytes:
        raise too_large
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limits.max_body_bytes:
            raise too_large
        chunks.append(chunk)
    state = request.app.state
    if getattr(state, "parse_limiter", None) is None:
        state.parse_limiter = anyio.CapacityLimiter(PARSE_CONCURRENCY)
    return await anyio.to_thread.run_sync(parse_body, b"".join(chunks), limits, limiter=state.parse_limiter)


R = TypeVar("R")


async def off_loop(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``fn(*args, **kwargs)`` on a worker thread: for a chat template and tokenizer over a long
    prompt (seconds per megabyte), so the event loop, ``/health`` included, keeps answering."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict[str, Any], unsupported: dict[str, str]) -> M:
    """Parse ``data`` into ``model``: a named 400 for unsupported, unknown or ill-typed fields.

    ``unsupported`` maps a field we know but do not implement to why; it is refused
    when present and not empty, never silently ignored.
    """
    for name, why in unsupported.items():
        if data.get(name) not in (None, [], {}):
            raise APIError(400, f"'{name}' is not supported by cholla yet ({why}); remove it from the request", param=name)
    # Sent empty, they ask for nothing: as if omitted (SDKs send "functions": null and the like).
    data = {key: value for key, value in data.items() if key not in unsupported}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in _field_path(error["loc"]))
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"unknown parameter '{where}'; remove it from the request", param=where) from None
        raise APIError(400, f"invalid '{where}': {error['msg']}", param=where) from None


def _field_path(loc: tuple) -> list:
    """The request's own field path, without the union-member tags pydantic adds (``stop.list[str]``)."""
    path = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list")):
            break
        path.append(part)
    return path


class StrictModel(BaseModel):
    """A request body that refuses fields it does not know."""

    model_config = ConfigDict(extra="forbid")


async def compile_off_loop(ctx: ServeContext, sampling_kwargs: dict[str, Any]) -> None:
    """Compile the request's grammar on a worker thread, so the event loop keeps answering (the first
    one builds llguidance's view of the vocabulary: seconds for Gemma's 262k tokens); ``prepare``
    and the engine then find it cached. A bad schema or grammar raises here (a 400)."""
    constraint = sampling_kwargs.get("structured_outputs")
    if constraint is not None:
        await off_loop(ctx.engine().engine.structured.compile, constraint)
