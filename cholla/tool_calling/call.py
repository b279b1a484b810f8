"""A parsed tool call and the pieces a stream sends of it.

``arguments`` is JSON text (an object), as OpenAI's API carries it; the chat
template gets it back as a dict (``arguments_dict``), as Hugging Face templates expect.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any

_ALNUM = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text

    @property
    def arguments_dict(self) -> dict[str, Any]:
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One step of a streamed call: the first has ``id`` and ``name``, the rest argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            entry.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments})
        else:
            entry["function"] = {"arguments": self.arguments}
        return entry


def new_call_id(prefix: str = "call_", length: int = 24) -> str:
    """A random call id: ``call_`` + 24 characters (OpenAI's look); Mistral's templates want 9 alphanumerics."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))
