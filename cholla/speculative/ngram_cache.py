"""An engine-wide n-gram table fed by every request's tokens, for drafts the request's own context lacks.

As llama.cpp's lookup cache and vLLM's suffix decoding: agent loops, code edits
and repeated questions produce text that an earlier request already produced.
Each n-gram (n = ``min_n``..``max_n``) of a request's tokens maps to the (up to
``span``) tokens that followed its latest occurrence. The table holds at most
``capacity`` n-grams and forgets the least recently used (set or looked up)
first; an entry costs about 350 bytes (its key, a continuation of ``span``
tokens, the dict slot). Unigrams are left out: one shared token says too little
about what follows in another request's text.
"""

from __future__ import annotations

from collections import OrderedDict

from cholla.speculative.ngram import MAX_NGRAM

MIN_NGRAM = 2


class NgramCache:
    def __init__(self, capacity: int, span: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM):
        self.capacity, self.span, self.max_n, self.min_n = capacity, span, max_n, min_n
        self.table: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.table)

    def add(self, token_ids: list[int]) -> None:
        """Record every n-gram of ``token_ids`` with what followed it (later occurrences win)."""
        tokens, table = tuple(token_ids), self.table
        for end in range(self.min_n, len(tokens)):
            following = tokens[end : end + self.span]
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tokens[end - n : end]
                table[key] = following
                table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def lookup(self, token_ids: list[int], k: int, min_n: int = MIN_NGRAM) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed the longest recorded suffix of ``token_ids`` (at least
        ``min_n`` long), and that suffix's length; ([], 0) when none is recorded."""
        for n in range(min(self.max_n, len(token_ids)), max(min_n, self.min_n) - 1, -1):
            key = tuple(token_ids[-n:])
            following = self.table.get(key)
            if following:
                self.table.move_to_end(key)
                return list(following[:k]), n
        return [], 0
