"""What every route needs: the settings, the engine host, the model's tokenizer and chat template.

Also the steps both APIs share: check the model name, encode a conversation, fit
``max_tokens`` into the context and run the engine's own validation before a
response starts, so every client mistake is a 400 and never a broken stream.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
import json
from typing import Any, AsyncIterator, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from cholla.engine.async_engine import AsyncLLMEngine
from cholla.engine.outputs import RequestOutput
from cholla.errors import ChollaError
from cholla.sampling.params import SamplingParams
from cholla.serve.errors import APIError
from cholla.serve.host import Admission, EngineHost
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat
from cholla.tokenizer.tokenizer import Tokenizer


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


class ServeContext:
    def __init__(self, settings: ServerSettings, host: EngineHost):
        self.settings, self.host = settings, host
        self._chat_template: ChatTemplate | None = None

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
                    template_kwargs: dict[str, Any] | None = None, continue_final_message: bool = False) -> list[int]:
        return encode_chat(self.tokenizer, self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, **(template_kwargs or {}))

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
        num_seqs = params.n * len(prompts)
        if num_seqs > self.host.max_in_flight:
            raise APIError(400, f"the request asks for {num_seqs} sequences but the server holds at most "
                                f"{self.host.max_in_flight} at once; lower n or send fewer prompts", param="n")
        return Prepared(request_id, prompts, params, self.host.admit(num_seqs))


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 (never a traceback) for anything else."""
    body = await request.body()
    try:
        data = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict[str, Any], unsupported: dict[str, str]) -> M:
    """Parse ``data`` into ``model``: a named 400 for unsupported, unknown or ill-typed fields.

    ``unsupported`` maps a field we know but do not implement to why; it is refused
    when present and not empty, never silently ignored.
    """
    for name, why in unsupported.items():
        if data.get(name) not in (None, [], {}):
            raise APIError(400, f"'{name}' is not supported by cholla yet ({why}); remove it from the request", param=name)
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
