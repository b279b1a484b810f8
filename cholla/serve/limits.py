"""What one request may hold, and the JSON parse that holds it to that.

Every JSON route reads its body through ``context.read_json``, which checks the
size (413) and content type (415) and then hands the bytes to ``parse_body`` on a
worker thread, so a large body never stalls the event loop. ``parse_body``
refuses, with a 400 that names the field, what Python's ``json`` accepts but
nothing downstream can use: nesting deeper than ``max_json_depth`` (checked
before parsing, which would otherwise recurse into a ``RecursionError``),
``NaN``/``Infinity`` and numbers too large for a float (``1e309``), and lone
UTF-16 surrogates (``"\\ud800"``), which no tokenizer can encode. The counts a
request may ask for (messages, content parts, stop strings, ``n``, logprobs)
are checked here or in ``ServeContext.prepare``, the same for every route.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from cholla.serve.errors import APIError


@dataclass
class RequestLimits:
    """Per-request bounds; each has a ``cholla serve`` flag (named in brackets)."""

    max_body_bytes: int = 8 * 2**20  # --max-body-size (MiB)
    max_json_depth: int = 64  # --max-json-depth
    max_messages: int = 2048  # --max-messages: entries of `messages` (or a list `input`)
    max_content_parts: int = 256  # --max-content-parts: parts of one message's content (or of `system`)
    max_stop: int = 16  # --max-stop: stop strings (`stop`, `stop_sequences`)
    max_stop_length: int = 256  # --max-stop-length: characters in one stop string
    max_n: int = 16  # --max-n: sequences per prompt
    max_logprobs: int = 20  # --max-logprobs: `logprobs`, `top_logprobs`, `prompt_logprobs` (vLLM's default)


# A JSON string literal, escapes included: what the depth scan skips.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_OPENERS, _CLOSERS = (b"[", b"{"), (b"]", b"}")


def nesting_depth(body: bytes, limit: int) -> int:
    """How deeply ``body``'s arrays and objects nest (brackets inside strings not counted), or 0 if
    it cannot exceed ``limit``. A vectorised scan: milliseconds for megabytes, where the parser's own
    recursion would end in a ``RecursionError`` on a deep body.
    """
    outside = _STRING.sub(b'""', body) if b'"' in body else body
    if sum(outside.count(c) for c in _OPENERS) <= limit:
        return 0
    raw = np.frombuffer(outside, dtype=np.uint8)
    steps = np.zeros(len(raw), dtype=np.int32)
    for c in _OPENERS:
        steps += raw == ord(c)
    for c in _CLOSERS:
        steps -= raw == ord(c)
    return int(np.cumsum(steps, out=steps).max())


def _path(parts: tuple) -> str:
    return ".".join(str(p) for p in parts) or "the request body"


def check_values(data: dict[str, Any]) -> None:
    """400 naming the first field whose value is unusable: not finite, or a lone surrogate.

    Only containers go on the stack and scalars are checked in place: a prompt of a
    million token ids costs a tenth of a second.
    """
    stack: list[tuple[dict | list, tuple]] = [(data, ())]
    while stack:
        container, path = stack.pop()
        for key, item in container.items() if isinstance(container, dict) else enumerate(container):
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                raise APIError(400, f"a key in '{_path(path)}' holds a lone UTF-16 surrogate; send valid Unicode",
                               param=_path(path))
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, (*path, key)))
            elif kind is float and not math.isfinite(item):
                where = _path((*path, key))
                raise APIError(400, f"'{where}' is not a finite number (NaN, Infinity and numbers beyond 1.8e308 "
                                    "are refused)", param=where)
            elif kind is str and not item.isascii() and _SURROGATE.search(item):
                where = _path((*path, key))
                raise APIError(400, f"'{where}' holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                                    "send valid Unicode", param=where)


def check_counts(data: dict[str, Any], limits: RequestLimits) -> None:
    """The list lengths every chat-shaped route shares: messages, and content parts per message."""
    for field in ("messages", "input"):
        messages = data.get(field)
        if not isinstance(messages, list):
            continue
        if len(messages) > limits.max_messages:
            raise APIError(400, f"'{field}' has {len(messages)} entries, more than this server's limit of "
                                f"{limits.max_messages} (--max-messages); shorten the conversation", param=field)
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and len(content) > limits.max_content_parts:
                raise APIError(400, f"'{field}.{i}.content' has {len(content)} parts, more than this server's limit "
                                    f"of {limits.max_content_parts} (--max-content-parts); merge them",
                               param=f"{field}.{i}.content")
    system = data.get("system")
    if isinstance(system, list) and len(system) > limits.max_content_parts:
        raise APIError(400, f"'system' has {len(system)} blocks, more than this server's limit of "
                            f"{limits.max_content_parts} (--max-content-parts); merge them", param="system")


def parse_body(body: bytes, limits: RequestLimits) -> dict[str, Any]:
    """The body as a JSON object, checked as the module docstring says; blocking, so run it on a thread."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start}); send UTF-8 JSON") from None
    depth = nesting_depth(body, limits.max_json_depth)
    if depth > limits.max_json_depth:
        raise APIError(400, f"the request body nests {depth} levels deep, more than this server's limit of "
                            f"{limits.max_json_depth} (--max-json-depth); flatten the request")
    try:
        data = json.loads(text)
    except ValueError as e:  # also the digit limit of huge integers
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    check_values(data)
    check_counts(data, limits)
    return data
