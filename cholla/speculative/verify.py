"""Greedy verification: keep drafts while they equal the target model's own choice."""

from __future__ import annotations


def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens plain greedy decoding would have produced, as far as this step can tell.

    ``targets[j]`` is the model's argmax after the sequence plus ``drafts[:j]``
    (``len(targets) == len(drafts) + 1``). Returns the accepted drafts followed by
    the target's token at the first disagreement (or after the last draft): 1 to
    ``len(drafts) + 1`` tokens, each exactly what one-token decoding would choose.
    """
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return targets[: accepted + 1]
