"""The HTTP server: a FastAPI app over one engine, OpenAI- and Anthropic-compatible.

``create_app(settings, load)`` returns an app that starts listening at once and
calls ``load`` on a thread; ``/health`` answers from the start, ``/ready`` and
the model routes say 503 until the model is loaded. With an API key set, every
route but ``/health`` and the static chat page wants it, as
``Authorization: Bearer KEY`` or ``x-api-key: KEY``. With ``allowed_origins`` set,
browsers on those origins may call it (CORS, Starlette's middleware; off by default).
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from cholla.engine.engine import LLMEngine
from cholla.errors import ChollaError
from cholla.serve import anthropic_api, openai_api
from cholla.serve.context import ServeContext, ServerSettings, StrictModel, read_json, validate
from cholla.serve.errors import APIError, error_body, error_response, is_anthropic_path
from cholla.serve.host import RETRY_AFTER_LOADING_S, EngineHost, HostState
from cholla.serve.metrics import ServerMetrics

log = logging.getLogger("cholla")

STATIC_DIR = Path(__file__).parent / "static"


class TokenizeRequest(StrictModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[openai_api.ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


def _check_api_key(request: Request) -> None:
    key = request.app.state.ctx.settings.api_key
    if key is None:
        return
    authorization = request.headers.get("authorization", "")
    given = authorization[7:] if authorization.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if given is None or not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                       code="invalid_api_key")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the shape of the API it was sent to; none as a traceback."""

    def shaped(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        body = error_body(status, message, is_anthropic_path(request.url.path))
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error, is_anthropic_path(request.url.path))

    @app.exception_handler(ChollaError)
    async def cholla_error(request: Request, error: ChollaError) -> JSONResponse:
        return shaped(request, 400, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return shaped(request, error.status_code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return shaped(request, 400, f"invalid request: {error.errors()[0].get('msg', error)}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return shaped(request, 500, f"internal server error ({type(error).__name__}); see the server log")


def _routes(ctx: ServeContext, metrics: ServerMetrics) -> APIRouter:
    """The server's own routes (the APIs' routes live in their modules)."""
    router = APIRouter()

    @router.get("/ready")
    async def ready() -> JSONResponse:
        if ctx.host.state is HostState.READY:
            return JSONResponse({"status": "ready"})
        if ctx.host.state is HostState.FAILED:
            return JSONResponse({"status": "failed", "error": ctx.host.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_LOADING_S)})

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def models() -> JSONResponse:
        engine = ctx.engine()
        data = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "cholla", "root": str(engine.engine.loaded.path),
                 "max_model_len": engine.engine.max_model_len} for name in ctx.settings.served_model_names]
        return JSONResponse({"object": "list", "data": data})

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(_tokenizer_info(ctx))

    @router.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        ctx.engine()
        body = validate(TokenizeRequest, await read_json(request), {})
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids = ctx.encode_chat(openai_api.template_messages(body.messages), body.add_generation_prompt)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = ctx.tokenizer.encode(body.prompt, add_special_tokens=add_special)
        result: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
        if body.return_token_strs:
            result["token_strs"] = [ctx.tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(result)

    @router.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        ctx.engine()
        body = validate(DetokenizeRequest, await read_json(request), {})
        ctx.check_model(body.model)
        vocab = ctx.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": ctx.tokenizer.decode(body.tokens)})

    return router


def _tokenizer_info(ctx: ServeContext) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info``: the tokenizer's settings as a ``tokenizer_config.json`` has them,
    so a client (lm-eval's remote tokenizer) can use the server's tokenizer through ``/tokenize``."""
    tokenizer = ctx.tokenizer
    special = sorted(tokenizer.special_token_ids)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # what transformers calls a ``tokenizers`` tokenizer
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": None if tokenizer.pad_token_id is None else tokenizer.id_to_token(tokenizer.pad_token_id),
        "unk_token": None if tokenizer.unk_token_id is None else tokenizer.id_to_token(tokenizer.unk_token_id),
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": tokenizer.add_eos,
        "added_tokens_decoder": {str(i): tokenizer.id_to_token(i) for i in special},
        "model_max_length": ctx.max_model_len,
        "vocab_size": tokenizer.vocab_size,
        "chat_template": ctx.chat_template.source,
    }


def create_app(
    settings: ServerSettings,
    load: Callable[[], LLMEngine],
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app; ``load`` builds the engine on a background thread once the server is up."""
    host = EngineHost(load, settings.max_queue, on_load_error)
    ctx = ServeContext(settings, host)
    metrics = ServerMetrics(host, ctx.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host.start()
        yield
        host.shutdown()

    app = FastAPI(title="cholla", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    _install_error_handlers(app)
    if settings.allowed_origins:  # answers OPTIONS preflights itself, before routing and the API key
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=settings.allowed_methods, allow_headers=settings.allowed_headers,
                           allow_credentials=settings.allow_credentials)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    auth = [Depends(_check_api_key)]
    app.include_router(_routes(ctx, metrics), dependencies=auth)
    app.include_router(openai_api.router, dependencies=auth)
    app.include_router(anthropic_api.router, dependencies=auth)
    return app
