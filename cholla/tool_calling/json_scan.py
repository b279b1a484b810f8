"""Find where JSON values end in text that may still be growing (a streamed reply).

The parsers need three answers about a value that starts at some index: where it
ends, that it has not ended yet, or that it cannot be JSON. ``json.loads`` gives only
the first; these scanners give all three, without building the value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"
_SCALAR_END = set(",}]:" + WHITESPACE)


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value at ``text[start]``; None if the text ends inside it.

    Raises ``ValueError`` when brackets do not match. A complete value is only well
    bracketed: ``json.loads`` of the slice says whether it is valid.
    """
    if start >= len(text):
        return None
    first = text[start]
    if first not in '{["':
        i = start
        while i < len(text) and text[i] not in _SCALAR_END:
            i += 1
        return i if i < len(text) else None  # a number may still grow
    stack: list[str] = []
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if not stack:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]":
            if not stack or stack.pop() != c:
                raise ValueError(f"unbalanced {c!r} at {i}")
            if not stack:
                return i + 1
    return None


@dataclass
class ObjectScan:
    """What is known of a JSON object so far: complete members (raw text), the member being written."""

    members: dict[str, str] = field(default_factory=dict)
    open_key: str | None = None  # the key whose value has started but not ended
    open_start: int = 0  # where that value starts
    end: int | None = None  # index just past the closing brace, once there


def scan_object(text: str, start: int) -> ObjectScan:
    """Walk the object at ``text[start] == "{"`` as far as the text goes; ``ValueError`` if it is not one."""
    scan = ObjectScan()
    if text[start] != "{":
        raise ValueError("not an object")
    i = skip_ws(text, start + 1)
    if i < len(text) and text[i] == "}":
        scan.end = i + 1
        return scan
    while i < len(text):
        if text[i] != '"':
            raise ValueError(f"expected a key at {i}")
        key_end = value_end(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return scan
        if text[i] != ":":
            raise ValueError(f"expected ':' at {i}")
        i = skip_ws(text, i + 1)
        if i >= len(text):
            scan.open_key, scan.open_start = key, i
            return scan
        end = value_end(text, i)
        if end is None:
            scan.open_key, scan.open_start = key, i
            return scan
        scan.members[key] = text[i:end]
        i = skip_ws(text, end)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] != ",":
            raise ValueError(f"expected ',' or '}}' at {i}")
        i = skip_ws(text, i + 1)
    return scan
