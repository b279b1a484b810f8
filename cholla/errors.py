"""Typed errors. Each message says what went wrong and what to do next.

The CLI and the server turn a ``ChollaError`` into one clear line (or an HTTP
error) instead of a traceback; anything else is a bug.
"""


class ChollaError(Exception):
    """Base of every error cholla raises on purpose for bad input."""


class ModelNotFoundError(ChollaError):
    """The model path does not exist and is not a known model name."""


class ModelFormatError(ChollaError):
    """A model file is not what it claims to be: not GGUF, truncated, corrupt, missing pieces."""


class UnsupportedQuantError(ModelFormatError):
    """A tensor uses a GGUF quantization type cholla cannot dequantize."""


class UnsupportedArchitectureError(ModelFormatError):
    """The model's architecture has no implementation in ``cholla.models``."""


class ContextLengthError(ChollaError):
    """A prompt (plus the tokens asked for) does not fit in the model's context."""


class ChatTemplateError(ChollaError):
    """The chat template failed to render, or raised on purpose (``raise_exception``)."""


class DownloadError(ChollaError):
    """A known model could not be fetched into the local cache."""


class InvalidRequestError(ChollaError):
    """A request asks for something impossible: bad sampling parameters, an unusable prompt."""
