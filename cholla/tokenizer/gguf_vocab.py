"""Rebuild a ``tokenizers.Tokenizer`` from the vocabulary a GGUF file stores as metadata.

A GGUF carries no ``tokenizer.json``: only llama.cpp's keys (``tokenizer.ggml.tokens``,
``scores``, ``token_type``, ``merges``, ``pre``...). The tokenizer they describe is a
byte-level BPE (``gpt2``) or a SentencePiece-style BPE with byte fallback (``llama``, and
Gemma 4's ``gemma4``, whose merges are listed).
We assemble the same pipeline Hugging Face ``transformers`` builds when it loads a
GGUF (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), so ids agree with it, and
take the split regexes of the ``gpt2`` family from llama.cpp where the two disagree.
"""

from __future__ import annotations

import logging
from array import array
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from cholla.errors import ModelFormatError

log = logging.getLogger("cholla")

# llama.cpp's token types (``llama_token_type``).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Split regexes per ``tokenizer.ggml.pre``. Several regexes apply one after the other,
# each cutting the pieces the previous one left (llama.cpp's ``regex_exprs``).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGITS = "digits"  # not a regex: tokenizers' ``Digits`` pre-tokenizer, one digit per piece

_GROUPS = {
    (GPT2_SPLIT,): ["default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"],
    (LLAMA3_SPLIT,): [
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "dbrx", "smaug-bpe", "chatglm-bpe",
    ],
    (QWEN2_SPLIT,): ["qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan", "kormo", "megrez"],
    (QWEN35_SPLIT,): ["qwen35"],
    (TEKKEN_SPLIT,): ["tekken"],
    (GPT4O_SPLIT,): ["gpt-4o", "llama4", "minimax-m2"],
    # Digits one by one, then GPT-2's split: the ``Digits(individual_digits)`` + ``ByteLevel``
    # pre-tokenizer of these models' own tokenizer.json (llama.cpp: "\p{N}" first).
    (DIGITS, GPT2_SPLIT): ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
}
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {name: splits for splits, names in _GROUPS.items() for name in names}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, which byte-level vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _list(metadata: Mapping[str, Any], key: str, length: int | None = None, required: bool = True) -> list | None:
    value = metadata.get(key)
    if value is None:
        if required:
            raise ModelFormatError(f"the GGUF metadata has no {key!r}; the file's tokenizer is incomplete")
        return None
    if not isinstance(value, list):
        raise ModelFormatError(f"GGUF metadata {key!r} should be an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ModelFormatError(
            f"GGUF metadata {key!r} has {len(value)} entries but the vocabulary has {length} tokens; the file is corrupt"
        )
    return value


def _merges(listed: list) -> list[tuple[str, str]]:
    merges = []
    for merge in listed:
        pair = merge.split(" ") if isinstance(merge, str) else ()
        if len(pair) != 2:
            raise ModelFormatError(f"GGUF merge {merge!r} is not two tokens separated by one space; the file is corrupt")
        merges.append((pair[0], pair[1]))
    return merges


def byte_level_pre_tokenizer(pre: str | None):
    """The split of a byte-level BPE, by ``tokenizer.ggml.pre``; GPT-2's for unknown names."""
    splits = PRE_TOKENIZER_SPLITS.get(pre or "default")
    if splits is None:
        log.warning("unknown tokenizer.ggml.pre %r: splitting text the GPT-2 way, ids may differ from the model's", pre)
        splits = (GPT2_SPLIT,)
    # ByteLevel's own regex is GPT-2's: the exact pipeline of a GPT-2 tokenizer.json.
    gpt2_last = splits[-1] == GPT2_SPLIT
    steps = [
        pre_tokenizers.Digits(individual_digits=True) if s == DIGITS else pre_tokenizers.Split(Regex(s), behavior="isolated")
        for s in (splits[:-1] if gpt2_last else splits)
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_last))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _byte_level(metadata: Mapping[str, Any], tokens: list[str]) -> tuple[Backend, bool]:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (some converters store them as plain text) get respelled.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    merges = _merges(_list(metadata, "tokenizer.ggml.merges"))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    return backend, True


def generate_merges(tokens: list[str], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary that lists none: every split of a token into two tokens.

    Best first: by the token's score, then the longer left piece. This is the order
    ``transformers`` derives (``generate_merges``), which we follow exactly so ids agree.
    Candidates are kept as token ids in flat arrays and the merges reuse the vocabulary's
    own strings: Gemma's 262k tokens imply 515k merges, ~170 MB more as tuples of new strings.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    score, left_len, right_len, left_id, right_id = array("d"), array("q"), array("q"), array("q"), array("q")
    for token, token_score in scores.items():
        local = []
        for i in range(1, len(token)):
            left = vocab.get(token[:i])
            if left is not None:
                right = vocab.get(token[i:])
                if right is not None:
                    local.append((left, right, i))
        local.sort()  # by (left id, right id)
        for left, right, i in local:
            score.append(token_score)
            left_len.append(i)
            right_len.append(len(token) - i)
            left_id.append(left)
            right_id.append(right)
    del vocab
    # Highest score first, then the longer left and right pieces; ties keep their order (a stable sort).
    order = np.lexsort((-np.asarray(right_len), -np.asarray(left_len), -np.asarray(score)))
    lefts, rights = np.asarray(left_id)[order].tolist(), np.asarray(right_id)[order].tolist()
    return [(tokens[left], tokens[right]) for left, right in zip(lefts, rights)]


def _sentencepiece(metadata: Mapping[str, Any], tokens: list[str]) -> tuple[Backend, bool]:
    gemma = metadata.get("general.architecture") in GEMMA_ARCHITECTURES
    if gemma:
        # Gemma files store tokens of 2+ spaces as real spaces, but text reaches the model with
        # spaces turned into "▁"; and their scores do not follow the merge order, the file order does.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {token: -index for index, token in enumerate(tokens)}
    else:
        raw_scores = _list(metadata, "tokenizer.ggml.scores", len(tokens))
        scores = dict(zip(tokens, raw_scores))
    vocab = {token: index for index, token in enumerate(tokens)}
    listed = _list(metadata, "tokenizer.ggml.merges", required=False)
    merges = _merges(listed) if listed else generate_merges(tokens, scores)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    if gemma:
        # Gemma never adds a prefix space: spaces simply become "▁".
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            steps.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(steps)
    return backend, False


def _gemma4(metadata: Mapping[str, Any], tokens: list[str]) -> tuple[Backend, bool]:
    """llama.cpp's ``gemma4`` tokenizer: Gemma's vocabulary (spaces as "▁", byte fallback, no prefix
    space) with its merges listed; runs of newlines are cut off before merging, as llama.cpp does."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges(_list(metadata, "tokenizer.ggml.merges"))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, False


# Architectures whose SentencePiece vocabulary is Gemma's (no prefix space, merges in file order).
GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding"})
BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece, "gemma4": _gemma4}


def backend_from_gguf(metadata: Mapping[str, Any]) -> tuple[Backend, int]:
    """The ``tokenizers.Tokenizer`` (model, normalizer, pre-tokenizer, decoder, added tokens), no post-processor,
    and the number of tokens the file lists.

    ``GGUFMetadata`` decodes an array on each access: each is read once here, and the
    lists are dropped once ``tokenizers`` holds its own copy.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind in (None, "none", "no"):
        raise ModelFormatError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing); pass token ids instead of text")
    if kind not in BUILDERS:
        raise ModelFormatError(
            f"tokenizer.ggml.model = {kind!r} is not supported (supported: {', '.join(sorted(BUILDERS))}); "
            "use the model's Hugging Face folder with its tokenizer.json instead"
        )
    tokens = _list(metadata, "tokenizer.ggml.tokens")
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError("GGUF metadata 'tokenizer.ggml.tokens' must be a non-empty array of strings")
    token_types = _list(metadata, "tokenizer.ggml.token_type", len(tokens), required=False) or [TOKEN_NORMAL] * len(tokens)
    try:
        backend, byte_level = BUILDERS[kind](metadata, tokens)
    except ModelFormatError:
        raise
    except Exception as e:  # tokenizers rejects a merge naming an unknown token, and so on
        raise ModelFormatError(f"the GGUF tokenizer metadata is inconsistent ({e}); the file is corrupt") from None
    _add_gguf_tokens(backend, tokens, token_types, byte_level)
    return backend, len(tokens)


def _add_gguf_tokens(backend: Backend, tokens: list[str], token_types: list[int], byte_level: bool) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens: both match whole in text.

    A byte-level vocabulary spells every real token in the byte alphabet, so a "control" token
    with another character is a converter's mislabel and is left out.
    """
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types)
        if kind == TOKEN_CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=False)
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, token_types)
            if kind == TOKEN_USER_DEFINED and t in vocab]
    backend.add_tokens(user)
