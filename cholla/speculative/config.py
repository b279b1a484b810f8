"""Which speculative method an engine runs, how many tokens it drafts, and from what; checked once at start."""

from __future__ import annotations

from cholla.errors import InvalidRequestError

METHODS = ("ngram", "draft", "tree", "layer_skip")
# Each drafted token is a row of the verification step; past ~16 the rows cost more
# than the few drafts that survive that far ever save.
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_SPECULATIVE_TOKENS = 4
# N-grams the engine-wide cache holds (ngram_cache.py): ~350 bytes each, ~22 MiB in all.
DEFAULT_NGRAM_CACHE_SIZE = 65536
# "tree": drafted nodes verified per step and sequence (the tree's rows, its root aside).
DEFAULT_TREE_BUDGET = 8
MAX_TREE_BUDGET = 64


def check_speculative(method: str | None, num_speculative_tokens: int, draft_model: object = None,
                      ngram_cache_size: int = 0, tree_budget: int = DEFAULT_TREE_BUDGET,
                      skip_layers: object = None) -> None:
    """Raise a one-line ``InvalidRequestError`` for an unknown method, a K out of range, a
    draft model missing for ``"draft"`` (or given to another method, where it would be ignored),
    skipped layers given to a method other than ``"layer_skip"`` (checked against the model at
    start, ``layer_skip.parse_skip_layers``), a bad n-gram cache size, or a tree budget out of
    range for ``"tree"``."""
    if method != "draft" and draft_model is not None:
        raise InvalidRequestError("a draft model is only used with speculative_method='draft' (--speculative-method draft)")
    if method != "layer_skip" and skip_layers is not None:
        raise InvalidRequestError(
            "skipped layers are only used with speculative_method='layer_skip' (--speculative-method layer_skip)")
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
    if isinstance(ngram_cache_size, bool) or not isinstance(ngram_cache_size, int) or ngram_cache_size < 0:
        raise InvalidRequestError(
            f"speculative_ngram_cache_size must be an integer >= 0 (0 turns the shared cache off), got {ngram_cache_size!r}"
        )
    if method == "tree" and (isinstance(tree_budget, bool) or not isinstance(tree_budget, int)
                             or not 1 <= tree_budget <= MAX_TREE_BUDGET):
        raise InvalidRequestError(
            f"spec_tree_budget (--spec-tree-budget) must be an integer in [1, {MAX_TREE_BUDGET}] (drafted nodes per "
            f"step), got {tree_budget!r}"
        )
