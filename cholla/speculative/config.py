"""Which speculative method an engine runs, how many tokens it drafts, and from what; checked once at start."""

from __future__ import annotations

from cholla.errors import InvalidRequestError

METHODS = ("ngram", "draft")
# Each drafted token is a row of the verification step; past ~16 the rows cost more
# than the few drafts that survive that far ever save.
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_SPECULATIVE_TOKENS = 4


def check_speculative(method: str | None, num_speculative_tokens: int, draft_model: object = None) -> None:
    """Raise a one-line ``InvalidRequestError`` for an unknown method, a K out of range, or a
    draft model missing for ``"draft"`` (or given to another method, where it would be ignored)."""
    if method != "draft" and draft_model is not None:
        raise InvalidRequestError("a draft model is only used with speculative_method='draft' (--speculative-method draft)")
    if method is None:
        return
    if method not in METHODS:
        raise InvalidRequestError(f"speculative method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if (isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int)
            or not 1 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS):
        raise InvalidRequestError(
            f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {num_speculative_tokens!r}"
        )
    if method == "draft" and draft_model is None:
        raise InvalidRequestError("speculative_method='draft' needs a draft model: pass --draft-model MODEL (draft_model=...)")
