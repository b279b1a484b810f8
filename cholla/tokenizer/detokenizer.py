"""Turn generated tokens into text one token at a time, for streaming.

Decoding token by token is wrong in two ways: a character split over byte tokens
(byte-level BPE, SentencePiece byte fallback) decodes to U+FFFD until its last byte
arrives, and SentencePiece decoders treat the first token of a text differently (a
stripped leading space). vLLM's answer, used here: decode a short window of earlier
tokens with and without the new ones and emit the difference, holding text back while
it ends in an incomplete character. Start-of-text effects hit both decodes alike and cancel.
"""

from __future__ import annotations

from typing import Sequence

from cholla.tokenizer.tokenizer import Tokenizer

# Tokens of context decoded before the new ones: enough for any merge a decoder does at a boundary.
PREFIX_WINDOW = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """``step(token_id)`` returns the text that token adds; the deltas join to ``decode(all generated ids)``.

    ``prompt_token_ids`` give the first window its left context, so the first generated
    token decodes as it would after the prompt (a leading space kept, not stripped).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids or ())
        self.num_prompt_tokens = len(self.token_ids)
        # Text up to read_offset has been emitted; prefix_offset starts the window decoded as context.
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - PREFIX_WINDOW, 0)
        self._text = ""
        # Tokenizer.decode's backend call, bound once: called for every token of every running request
        self._backend_decode = tokenizer.backend.decode

    def _decode(self, start: int, end: int | None = None) -> str:
        ids = self.token_ids[start:end]
        if len(ids) == 1:  # the left context while text flows: the last token alone, its text kept by id
            return self.tokenizer.decode_token(ids[0], self.skip_special_tokens)
        return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Add one generated token; return only the new, complete text (often "", never a broken character)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing yet, or a character still waiting for its remaining bytes
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self._text += delta
        return delta

    def flush(self) -> str:
        """Text held back at the end of generation (bytes that never completed a character), as U+FFFD."""
        if self.read_offset == len(self.token_ids):
            return ""
        delta = self._decode(self.prefix_offset)[len(self._decode(self.prefix_offset, self.read_offset)):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self._text += delta
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
