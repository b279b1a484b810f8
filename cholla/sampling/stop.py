"""Stop strings, matched on the detokenized text as it grows.

A stop string can span several tokens, so the engine checks after every new
piece of text (``find_stop``, looking only where a new match can be) and holds
back, while streaming, any tail that could still become a stop string
(``safe_prefix_len``), so that a client never sees half of one.
"""

from __future__ import annotations


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the earliest stop string in ``text`` begins, or None.

    ``text[:start]`` was searched before, so a new match must end past ``start``:
    each stop is looked for from ``start - len(stop) + 1`` on.
    """
    found = None
    for stop in stops:
        at = text.find(stop, max(0, start - len(stop) + 1))
        if at != -1 and (found is None or at < found):
            found = at
    return found


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be shown now: all but the longest suffix that begins some stop string."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return len(text) - held
