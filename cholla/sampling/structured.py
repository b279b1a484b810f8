"""Grammar-constrained decoding: JSON schemas, regexes, choices, GBNF/Lark grammars, any JSON object.

The engine sees a small interface that another backend (xgrammar) could fill:

    grammars = StructuredOutputs(tokenizer, vocab_size, eos_token_ids)
    compiled = grammars.compile(params)       # validated and cached by its source; bad input raises here
    matcher = compiled.matcher()              # one per sequence
    grammars.fill_bitmask(matchers, bitmask)  # bitmask: [rows, ceil(vocab/32)] int32, bit set = allowed
    matcher.consume(token_ids) / matcher.fast_forward_tokens() / matcher.is_finished / matcher.error

It is implemented on llguidance, whose matchers compute masks lazily (no
ahead-of-time compilation per schema) and fill a batch of rows in parallel.
The llguidance tokenizer is built once per cholla ``Tokenizer`` from its
``tokenizers`` JSON, which both GGUF-built and Hugging Face tokenizers have.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import jsonschema
import llguidance
import numpy as np
import torch

from cholla.errors import InvalidRequestError
from cholla.sampling.params import StructuredOutputsParams
from cholla.tokenizer.tokenizer import Tokenizer

MAX_CACHED_GRAMMARS = 256
# JSON as models usually write it ({"a": 1, "b": [2, 3]}): one canonical spacing instead of free
# whitespace, so a small model cannot wander into endless newlines, and more bytes are forced.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Why a request ended early when no token can continue its grammar.
DEAD_END = "structured output dead end: no token can continue the grammar"
# How error messages name each kind of source (the same words whichever request field carried it).
NOUNS = {"json": "the JSON schema", "regex": "the regex", "choice": "the choice list", "grammar": "the grammar"}

_ll_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ll_tokenizers_lock = threading.Lock()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def grammar_source(spec: StructuredOutputsParams) -> tuple[str, str]:
    """``(kind, text)``: what the grammar is compiled from, canonical, so equal requests share a cache entry."""
    if spec.json_object:
        return "json", json.dumps({"type": "object"})
    if spec.json is not None:
        return "json", json.dumps(spec.json)  # key order kept: it is the order properties are written in
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "choice", json.dumps(list(spec.choice))
    return "grammar", spec.grammar


def _llguidance_grammar(kind: str, text: str) -> str:
    """The llguidance grammar for a source; ``InvalidRequestError`` when it cannot be converted."""
    try:
        if kind == "json":
            _check_schema(json.loads(text))
            return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        if kind == "choice":
            return llguidance.grammar_from("choice", text)
        return llguidance.grammar_from("grammar", text)  # Lark, or GBNF through llguidance's converter
    except ValueError as e:
        raise InvalidRequestError(f"{NOUNS[kind]} is invalid: {e}") from None


def _check_schema(schema: dict | bool) -> None:
    """A JSON schema must be valid under its own metaschema; the error names the place (``$.properties.age.type``)."""
    validator = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is not None:
        raise InvalidRequestError(f"the JSON schema is not valid at {error.json_path}: {error.message}")


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary, built once per tokenizer (Gemma's 262k tokens take seconds).

    ``vocab_size`` is the model's logits width; ids past the tokenizer's own are never allowed.
    """
    key = (vocab_size, tuple(sorted(eos_token_ids)))
    with _ll_tokenizers_lock:
        built = _ll_tokenizers.setdefault(tokenizer, {})
        if key not in built:
            built[key] = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=max(vocab_size, tokenizer.vocab_size), eos_token=list(key[1])
            )
        return built[key]


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def consume(self, token_ids: list[int]) -> bool:
        """Advance over tokens the model produced; False (and ``error`` set) when the grammar refuses one."""
        return self._matcher.consume_tokens(token_ids)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of ``token_ids``, in order, the grammar would take from here (the matcher stays put)."""
        return self._matcher.validate_tokens(token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` consumed (a speculating sequence's drafts, once their masks are read)."""
        self._matcher.rollback(num_tokens)

    def fast_forward_tokens(self) -> list[int]:
        """Tokens the grammar forces next (the only continuation), to append without sampling them."""
        return self._matcher.compute_ff_tokens()

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and nothing may follow (an end-of-generation token at most)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why no token can continue (llguidance's stop reason), or None while the grammar can go on."""
        if not self._matcher.is_error():
            return None
        return f"{DEAD_END} ({self._matcher.get_error().strip().splitlines()[0]})"


@dataclass
class CompiledGrammar:
    grammar: str  # llguidance's serialized grammar
    tokenizer: llguidance.LLTokenizer

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0))


class StructuredOutputs:
    """Compiles requests' grammars for one model's vocabulary and fills the batched token masks."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, set(eos_token_ids)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # requests are validated on server threads while the engine steps
        self._executor: llguidance.LLExecutor | None = None

    @property
    def mask_words(self) -> int:
        """Width of a bitmask row: llguidance's vocabulary covers the model's logits and the tokenizer's ids."""
        return bitmask_words(max(self.vocab_size, self.tokenizer.vocab_size))

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Check and compile ``spec``; ``InvalidRequestError`` saying what is wrong and where."""
        source = grammar_source(spec)
        with self._lock:
            if source in self._cache:
                self._cache.move_to_end(source)
                return self._cache[source]
        tokenizer = ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_token_ids)
        grammar = _llguidance_grammar(*source)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise InvalidRequestError(f"{NOUNS[source[0]]} is invalid: {messages[0].strip()}")
        compiled = CompiledGrammar(grammar, tokenizer)
        probe = compiled.matcher()
        probe._matcher.compute_bitmask()  # a grammar that matches nothing shows here
        error = probe.error
        if error is not None:
            raise InvalidRequestError(f"{NOUNS[source[0]]} admits no output at all: {error}")
        with self._lock:
            self._cache[source] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Row ``i`` of ``bitmask: [len(matchers), ceil(vocab/32)]`` int32 gets matcher ``i``'s allowed tokens."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))
        words = bitmask.shape[1]
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and words == self.mask_words
        self._executor.unsafe_compute_mask_ptr(
            [(m._matcher, row) for row, m in enumerate(matchers)], bitmask.data_ptr(), words * 4, len(matchers)
        )


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``bitmask: [rows, words]`` int32 → ``[rows, vocab_size]`` bool, bit ``t % 32`` of word ``t // 32``."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab_size]).view(torch.bool)
