"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the sequence's suffix.

As llama.cpp's ``lookup`` and vLLM's n-gram proposer: take the last ``n`` tokens of
prompt + output (``n`` from ``max_n`` down to ``min_n``, the longest match wins),
find where they occurred before, and propose the (up to ``k``) tokens that came
next. Text that copies from its input (rewrites, code edits, quotes) drafts well;
the latest occurrence is taken, as the most likely to be the one being copied.
"""

from __future__ import annotations

import numpy as np

MAX_NGRAM = 3
MIN_NGRAM = 1


def propose(token_ids: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` draft tokens for ``token_ids`` (prompt + output), or [] when no suffix recurs."""
    return match(token_ids, k, max_n, min_n)[0]


def match(token_ids: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM) -> tuple[list[int], int]:
    """``propose``'s drafts and the length of the suffix that matched (0: none)."""
    if k <= 0 or len(token_ids) < 2:
        return [], 0
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # ends[j]: an earlier window tokens[end - n : end] (end < length) that equals the suffix.
        ends = np.flatnonzero(tokens[n - 1 : length - 1] == tokens[-1]) + n
        for back in range(1, n):
            ends = ends[tokens[ends - 1 - back] == tokens[length - 1 - back]]
        if ends.size:
            end = int(ends[-1])
            return tokens[end : end + k].tolist(), n
    return [], 0


def continuations(token_ids: list[int], k: int, max_count: int, max_n: int = MAX_NGRAM,
                  min_n: int = MIN_NGRAM) -> tuple[list[list[int]], int]:
    """Up to ``max_count`` distinct continuations (up to ``k`` tokens each) of earlier occurrences
    of the sequence's suffix, best first: longer suffixes first, and for each the latest
    occurrence first; and the first one's suffix length (0: none). The first is ``match``'s
    draft; the others are a token tree's branches."""
    if k <= 0 or max_count <= 0 or len(token_ids) < 2:
        return [], 0
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    found: list[list[int]] = []
    longest = 0
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        ends = np.flatnonzero(tokens[n - 1 : length - 1] == tokens[-1]) + n
        for back in range(1, n):
            ends = ends[tokens[ends - 1 - back] == tokens[length - 1 - back]]
        for end in ends[::-1][: 8 * max_count].tolist():  # a common token may recur thousands of times
            following = tokens[end : end + k].tolist()
            if following not in found:
                found.append(following)
                longest = longest or n
                if len(found) == max_count:
                    return found, longest
    return found, longest
