"""The HTTP server: OpenAI- and Anthropic-compatible APIs, Prometheus metrics and the chat page."""

from cholla.serve.app import create_app
from cholla.serve.context import ServerSettings

__all__ = ["ServerSettings", "create_app"]
