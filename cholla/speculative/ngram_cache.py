"""An engine-wide n-gram table fed by every request's tokens, for drafts the request's own context lacks.

As llama.cpp's lookup cache and vLLM's suffix decoding: agent loops, code edits
and repeated questions produce text that an earlier request already produced.
Each n-gram (n = ``min_n``..``max_n``) of a request's tokens maps to the (up to
``span``) tokens that followed its latest occurrence, and, with ``alternatives``
above 1, to as many distinct continuations of its latest occurrences, newest
first (the branches of a token tree, ``tree.py``). The table holds at most
``capacity`` n-grams and forgets the least recently used (set or looked up)
first; an entry costs about 400 bytes (its key, a continuation of ``span``
tokens, the dict slot), and ~100 more per further alternative. Unigrams are left out: one shared token says too little
about what follows in another request's text.
"""

from __future__ import annotations

from collections import OrderedDict

from cholla.speculative.ngram import MAX_NGRAM

MIN_NGRAM = 2


class NgramCache:
    def __init__(self, capacity: int, span: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM,
                 alternatives: int = 1):
        self.capacity, self.span, self.max_n, self.min_n = capacity, span, max_n, min_n
        self.alternatives = alternatives
        # n-gram -> distinct continuations, the latest first
        self.table: OrderedDict[tuple[int, ...], tuple[tuple[int, ...], ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.table)

    def add(self, token_ids: list[int]) -> None:
        """Record every n-gram of ``token_ids`` with what followed it (later occurrences win)."""
        tokens, table = tuple(token_ids), self.table
        for end in range(self.min_n, len(tokens)):
            following = tokens[end : end + self.span]
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tokens[end - n : end]
                earlier = table.get(key, ()) if self.alternatives > 1 else ()
                table[key] = (following, *(c for c in earlier if c != following))[: self.alternatives]
                table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def lookup(self, token_ids: list[int], k: int, min_n: int = MIN_NGRAM) -> tuple[list[int], int]:
        """Up to ``k`` tokens that followed the longest recorded suffix of ``token_ids`` (at least
        ``min_n`` long), and that suffix's length; ([], 0) when none is recorded."""
        found, n = self.lookup_alternatives(token_ids, k, min_n)
        return (found[0], n) if found else ([], 0)

    def lookup_alternatives(self, token_ids: list[int], k: int, min_n: int = MIN_NGRAM) -> tuple[list[list[int]], int]:
        """``lookup`` with every recorded continuation of that suffix (up to ``alternatives``), the latest first."""
        for n in range(min(self.max_n, len(token_ids)), max(min_n, self.min_n) - 1, -1):
            key = tuple(token_ids[-n:])
            found = self.table.get(key)
            if found and found[0]:
                self.table.move_to_end(key)
                return [list(following[:k]) for following in found], n
        return [], 0
