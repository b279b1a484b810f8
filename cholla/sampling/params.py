"""How one request wants its tokens chosen: vLLM's ``SamplingParams``, same names and defaults.

Checked on construction, so a bad value fails when the request arrives, with
an ``InvalidRequestError`` that names the field, not in the middle of a step.
"""

from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass

from cholla.errors import InvalidRequestError

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# The sampler holds every float parameter in a float32 tensor: larger values become inf there.
FLOAT32_MAX = 3.4028234663852886e38
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# OpenAI's range for logit_bias values; +-100 already bans or forces a token.
MAX_LOGIT_BIAS = 100.0
# Below this a repetition penalty pushes ordinary logits past float32's range (inf, then NaN).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


def _fail(field: str, value, should: str) -> None:
    shown = repr(value)
    raise InvalidRequestError(f"{field} must be {should}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX


def _is_number(value) -> bool:
    """A finite int or float that float32 holds (what the sampler's tensors take)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= FLOAT32_MAX)


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a language, as vLLM spells it: exactly one of these is set.

    ``json`` is a JSON schema (a dict or its JSON text); ``json_object`` any JSON
    object; ``regex`` a regular expression; ``choice`` one of the given strings;
    ``grammar`` a GBNF (llama.cpp) or Lark grammar. ``cholla.sampling.structured``
    compiles it against the model's vocabulary.
    """

    json: str | dict | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs takes exactly one of json, regex, choice, grammar or json_object; "
                f"got {', '.join(given) if given else 'none'}"
            )
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except (ValueError, RecursionError) as e:  # RecursionError: a schema nested thousands deep
                raise InvalidRequestError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            _fail("structured_outputs.json", self.json, "a JSON schema (an object, or its JSON text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(f"structured_outputs.{name}", value, "a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple)) or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            _fail("structured_outputs.choice", self.choice, "a non-empty list of non-empty strings")
        if not isinstance(self.json_object, bool):
            _fail("structured_outputs.json_object", self.json_object, "true or false")


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # a list after __post_init__
    stop_token_ids: list[int] | None = None  # a list after __post_init__
    ignore_eos: bool = False
    max_tokens: int | None = 16  # 0: nothing is generated, the prompt is only scored (prompt_logprobs)
    min_tokens: int = 0
    logprobs: int | None = None  # how many top alternatives to return with each token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    prompt_logprobs: int | None = None  # top alternatives per prompt token, computed in the prefill
    structured_outputs: StructuredOutputsParams | None = None  # grammar-constrained decoding
    speculative_decoding: bool = True  # False: decode one token per step even when the engine speculates

    def __post_init__(self):
        try:
            self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            self.stop_token_ids = list(self.stop_token_ids or [])
        except TypeError:
            _fail("stop", self.stop, "a string or a list of strings, and stop_token_ids a list of token ids")
        if self.logit_bias is not None:
            # JSON object keys arrive as strings.
            try:
                self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError, OverflowError):
                _fail("logit_bias", self.logit_bias, "a mapping of token ids to numbers")
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        if self.greedy:
            # As vLLM: truncation does not change an argmax, so greedy rows skip it.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify(self) -> None:
        """Every field's type and range, here once for every caller (the Python API and all server routes)."""
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            if not _is_number(getattr(self, name)):
                _fail(name, getattr(self, name), "a finite number")
        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                _fail(name, getattr(self, name), "an integer")
        if self.n < 1:
            _fail("n", self.n, "an integer >= 1")
        if not -2.0 <= self.presence_penalty <= 2.0:
            _fail("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            _fail("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            _fail("repetition_penalty", self.repetition_penalty,
                  f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}] (1 turns it off)")
        if not self.temperature >= 0.0:
            _fail("temperature", self.temperature, ">= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", self.top_p, "in (0, 1] (1 turns it off)")
        if self.top_k < -1:
            _fail("top_k", self.top_k, "an integer >= 1, or 0 or -1 to turn it off")
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", self.min_p, "in [0, 1] (0 turns it off)")
        if self.seed is not None and not (isinstance(self.seed, int) and INT64_MIN <= self.seed < 2**64):
            _fail("seed", self.seed, "an integer in [-2**63, 2**64) or None")  # what torch.Generator takes
        if any(not isinstance(s, str) or not s for s in self.stop):
            _fail("stop", self.stop, "non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", self.stop_token_ids, "non-negative token ids")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            _fail("max_tokens", self.max_tokens, "an integer >= 0 (0: only score the prompt), or None for no limit")
        if self.min_tokens < 0:
            _fail("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"<= max_tokens={self.max_tokens}")
        for name, what in (("logprobs", "an integer >= 0, or None"),
                           ("prompt_logprobs", "an integer >= 0 (top alternatives per prompt token), or None")):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                _fail(name, value, what)
        if self.logit_bias is not None:
            if any(not _is_int(t) or t < 0 for t in self.logit_bias):
                _fail("logit_bias", self.logit_bias, "keyed by non-negative token ids")
            if any(not _is_number(b) or abs(b) > MAX_LOGIT_BIAS for b in self.logit_bias.values()):
                _fail("logit_bias", self.logit_bias, f"a mapping to finite numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if not isinstance(self.speculative_decoding, bool):
            _fail("speculative_decoding", self.speculative_decoding, "true or false")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            _fail("structured_outputs", self.structured_outputs, "a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def verify_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the model's vocabulary; call when it arrives."""
        for field, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{field} names token ids {bad[:5]} outside the vocabulary of {vocab_size} tokens"
                )
