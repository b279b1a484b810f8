"""Prompt lookup: draft the tokens that followed the earlier occurrence of the sequence's suffix
that matches it longest.

As llama.cpp's ``lookup`` and vLLM's n-gram proposer, with the match length of
suffix decoding (Arctic): of every earlier place where the last token of prompt +
output occurred, take the one whose preceding tokens agree with the sequence's
longest (counted up to ``max_n``; the latest among equals), and propose the (up
to ``k``) tokens that came next. Text that copies from its input (rewrites, code
edits, quotes) drafts well, and the longer the match the likelier its drafts hold
(``speculator.match_acceptance``): a phrase that recurs ("the", "\n    ") is told
apart from the passage being copied by how far back it agrees.
"""

from __future__ import annotations

import numpy as np

MAX_NGRAM = 3  # the token trees' and the shared cache's n-grams
MIN_NGRAM = 1
# How far back a match is counted: past this a match is as good as a longer one.
MAX_MATCH = 32


def propose(token_ids: list[int], k: int, max_n: int = MAX_MATCH, min_n: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` draft tokens for ``token_ids`` (prompt + output), or [] when no suffix recurs."""
    return match(token_ids, k, max_n, min_n)[0]


def match(token_ids: list[int], k: int, max_n: int = MAX_MATCH, min_n: int = MIN_NGRAM) -> tuple[list[int], int]:
    """``propose``'s drafts and the length of the suffix that matched (0: none; at most ``max_n``)."""
    if k <= 0 or len(token_ids) < 2:
        return [], 0
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    max_n = min(max_n, length - 1)
    # ends: the ends of the earlier windows tokens[end - n : end] (end < length) equal to the suffix of length n.
    ends, n = np.flatnonzero(tokens[: length - 1] == tokens[-1]) + 1, 1
    if not ends.size:
        return [], 0
    while ends.size > 1 and n < max_n:
        longer = ends[ends > n]  # windows that can reach back one more token
        longer = longer[tokens[longer - 1 - n] == tokens[length - 1 - n]]
        if not longer.size:
            break
        ends, n = longer, n + 1
    end = int(ends[-1])  # the latest of the longest
    if ends.size == 1 and n < max_n:  # one candidate left: count how far back it agrees at once
        reach = min(max_n, end) - n
        earlier = tokens[end - n - reach : end - n][::-1]
        later = tokens[length - n - reach : length - n][::-1]
        differ = np.flatnonzero(earlier != later)
        n += int(differ[0]) if differ.size else reach
    if n < min_n:
        return [], 0
    return tokens[end : end + k].tolist(), n


class TokenIndex:
    """One growing sequence's tokens by where each occurs, kept from step to step, and ``match``
    read from it: a step's lookup walks the earlier occurrences of the sequence's last token in
    plain Python, where ``match`` makes an array of the whole sequence and compares every token.
    Beside a decode step (which sweeps the caches with the model's weights) that array work cost
    a single stream ~80 us a step on SmolLM2, ~2% of the step (docs/benchmarks.md); this ~10-20."""

    def __init__(self) -> None:
        self.positions: dict[int, list[int]] = {}
        self.size = 0  # tokens indexed so far
        self.last = -1  # the last indexed token, to tell a sequence that changed from one that grew

    def update(self, token_ids: list[int]) -> None:
        """Index the tokens appended since the last call (a sequence that did not just grow: all of them)."""
        if self.size > len(token_ids) or (self.size and token_ids[self.size - 1] != self.last):
            self.positions, self.size = {}, 0
        positions = self.positions
        for p in range(self.size, len(token_ids)):
            found = positions.get(token_ids[p])
            if found is None:
                positions[token_ids[p]] = [p]
            else:
                found.append(p)
        self.size = len(token_ids)
        self.last = token_ids[-1] if token_ids else -1

    def match(self, token_ids: list[int], k: int, max_n: int = MAX_MATCH, min_n: int = MIN_NGRAM
              ) -> tuple[list[int], int]:
        """``match(token_ids, k, max_n, min_n)``, the same answer (tests), for the sequence this index follows."""
        self.update(token_ids)
        length = len(token_ids)
        if k <= 0 or length < 2:
            return [], 0
        max_n = min(max_n, length - 1)
        last = token_ids[-1]
        found = self.positions[last]
        ends = [p + 1 for p in (found[:-1] if found[-1] == length - 1 else found)]
        if not ends:
            return [], 0
        n = 1
        while len(ends) > 1 and n < max_n:
            want = token_ids[length - 1 - n]
            longer = [end for end in ends if end > n and token_ids[end - 1 - n] == want]
            if not longer:
                break
            ends, n = longer, n + 1
        end = ends[-1]
        if len(ends) == 1 and n < max_n:  # one candidate left: count how far back it agrees
            reach, agree = min(max_n, end) - n, 0
            while agree < reach and token_ids[end - n - 1 - agree] == token_ids[length - n - 1 - agree]:
                agree += 1
            n += agree
        if n < min_n:
            return [], 0
        return token_ids[end : end + k], n


def continuations(token_ids: list[int], k: int, max_count: int, max_n: int = MAX_NGRAM,
                  min_n: int = MIN_NGRAM) -> tuple[list[list[int]], int]:
    """Up to ``max_count`` distinct continuations (up to ``k`` tokens each) of earlier occurrences
    of the sequence's suffix, best first: ``match``'s draft (the longest match), then those of the
    suffix's last ``max_n`` down to ``min_n`` tokens, for each n the latest occurrence first; and
    the first one's match length (0: none). The others are a token tree's branches."""
    if k <= 0 or max_count <= 0 or len(token_ids) < 2:
        return [], 0
    first, longest = match(token_ids, k, min_n=min_n)
    if not first:
        return [], 0
    found = [first]
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        ends = np.flatnonzero(tokens[n - 1 : length - 1] == tokens[-1]) + n
        for back in range(1, n):
            ends = ends[tokens[ends - 1 - back] == tokens[length - 1 - back]]
        for end in ends[::-1][: 8 * max_count].tolist():  # a common token may recur thousands of times
            if len(found) == max_count:
                return found, longest
            following = tokens[end : end + k].tolist()
            if following not in found:
                found.append(following)
    return found[:max_count], longest
