"""HTTP errors in each API's own JSON shape.

Routes raise ``APIError`` (or a ``ChollaError``, which is the client's fault: 400);
the app's handlers render it as OpenAI's ``{"error": {...}}`` or, under
``/v1/messages``, Anthropic's ``{"type": "error", "error": {...}}``.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

# status -> (OpenAI error type, Anthropic error type)
ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("service_unavailable", "overloaded_error"),
}


class APIError(Exception):
    """An error to send to the client, with its HTTP status and the parameter at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(status: int, message: str, anthropic: bool, param: str | None = None, code: str | None = None) -> dict:
    openai_type, anthropic_type = ERROR_TYPES.get(status, ERROR_TYPES[500] if status >= 500 else ERROR_TYPES[400])
    if anthropic:
        return {"type": "error", "error": {"type": anthropic_type, "message": message}}
    return {"error": {"message": message, "type": openai_type, "param": param, "code": code}}


def error_response(error: APIError, anthropic: bool) -> JSONResponse:
    body = error_body(error.status, error.message, anthropic, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)
