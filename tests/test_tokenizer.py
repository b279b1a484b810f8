"""cholla.tokenizer against Hugging Face ``transformers`` loading the same GGUF files.

The real models are fetched into cholla's cache on first use; the tiny synthetic
vocabularies at the end need no file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cholla.download import resolve_model
from cholla.errors import ModelFormatError
from cholla.formats.gguf import read_gguf
from cholla.tokenizer import IncrementalDetokenizer, Tokenizer
from cholla.tokenizer.gguf_vocab import bytes_to_unicode


def model_file(name: str) -> Path:
    """The real model, fetched into cholla's cache on first use (as the model tests do)."""
    return resolve_model(name)


def random_unicode(seed: int, length: int) -> str:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "runs   of    spaces     here",
    "\n\n\t  x",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "emoji 👍🏽 and ZWJ 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵",
    "café naïve résumé façade Ångström",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f",
    "日本語のテキスト、中文字符。한국어 텍스트",
    "مرحبا بالعالم، كيف حالك؟",
    "def f(x):\n    if x:\n        return x ** 2  # square\n\treturn None\n",
    "12345 3.14159 1,000,000 x²+½ ٣٤ 10%",
    "I'm sure they'll say it's fine, don't you think? WE'VE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text that starts with the BOS token",
    "",
    " ",
    "\n",
    random_unicode(seed=1234, length=3000),
]


def _hf_reference(name: str, path: Path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if name == "smollm2":
        # SmolLM2's own tokenizer.json splits digits one by one before the byte-level split
        # (llama.cpp's "smollm" pre-tokenizer does the same); transformers' GGUF loader drops
        # that step, which shows only for non-ASCII digits after a space (" ½"). Put it back
        # so the reference is the model's real tokenizer.
        hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    return hf


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request):
    """(model name, our Tokenizer, transformers' tokenizer) for one real model."""
    path = model_file(request.param)
    ours = Tokenizer.from_gguf(read_gguf(path).metadata)
    return request.param, ours, _hf_reference(request.param, path)


def _hf_ids(hf, ours: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    ids = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
    # transformers adds BOS even before a text that starts with it; we do not (no double BOS).
    if add_special_tokens and ours.add_bos and ids[:2] == [ours.bos_token_id] * 2:
        ids = ids[1:]
    return ids


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    _, ours, hf = pair
    for text in CORPUS:
        assert ours.encode(text, add_special_tokens) == _hf_ids(hf, ours, text, add_special_tokens), repr(text[:80])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair, skip_special_tokens):
    _, ours, hf = pair
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens), repr(text[:80])


def test_round_trip(pair):
    name, ours, _ = pair
    # SmolLM2's byte alphabet lacks a few control characters: BPE drops them, in transformers too.
    dropped = str.maketrans("", "", "\x04\x06\x13\x14\x16\x1d") if name == "smollm2" else {}
    for text in CORPUS:
        if name == "smollm2" or not text.startswith("<"):  # SmolLM2 has no <bos>/<start_of_turn> tokens
            decoded = ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False)
            assert decoded == text.translate(dropped), repr(text[:80])


def test_special_tokens_and_metadata(pair):
    name, ours, hf = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token)
    assert ours.add_bos == (name == "gemma3")
    assert ours.vocab_size == (49152 if name == "smollm2" else 262144)
    turn_end = "<|im_end|>" if name == "smollm2" else "<end_of_turn>"
    assert ours.token_to_id(turn_end) in ours.eog_token_ids
    assert ours.eos_token_id in ours.eog_token_ids
    assert ours.encode(turn_end, add_special_tokens=False) == [ours.token_to_id(turn_end)]
    assert ours.id_to_token(ours.token_to_id(turn_end)) == turn_end


def test_no_double_bos(pair):
    name, ours, _ = pair
    if not ours.add_bos:
        pytest.skip(f"{name} adds no BOS")
    ids = ours.encode(f"{ours.bos_token}hi")
    assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id
    assert ours.encode("hi")[0] == ours.bos_token_id
    assert ours.encode("", add_special_tokens=True) == [ours.bos_token_id]


def test_smollm2_splits_digits_like_its_own_tokenizer(pair):
    name, ours, _ = pair
    if name != "smollm2":
        pytest.skip("SmolLM2 only")
    # " ½" is "Ġ" then "Â½": the digit is split off before BPE, as in SmolLM2's tokenizer.json.
    assert [ours.id_to_token(i) for i in ours.encode(" ½")] == ["Ġ", "Â½"]


def _stream(ours: Tokenizer, ids: list[int], prompt: list[int] | None = None, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip)
    deltas = [detok.step(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_detokenizer(pair, skip_special_tokens):
    _, ours, _ = pair
    for text in CORPUS:
        ids = ours.encode(text, add_special_tokens=False)
        deltas = _stream(ours, ids, skip=skip_special_tokens)
        assert "".join(deltas) == ours.decode(ids, skip_special_tokens), repr(text[:80])
        assert not any("\ufffd" in d for d in deltas), repr(text[:80])


def test_incremental_detokenizer_after_prompt(pair):
    _, ours, _ = pair
    prompt = ours.encode("Question: what is this?\nAnswer:")
    for text in CORPUS:
        ids = ours.encode(" " + text, add_special_tokens=False)
        full = ours.decode(prompt + ids)
        assert "".join(_stream(ours, ids, prompt)) == full[len(ours.decode(prompt)):], repr(text[:80])


def test_detokenizer_holds_back_split_characters(pair):
    _, ours, _ = pair
    ids = ours.encode("家族👨‍👩‍👧‍👦", add_special_tokens=False)
    deltas = _stream(ours, ids)
    assert "".join(deltas) == "家族👨‍👩‍👧‍👦"
    # Incomplete byte sequence at the end: held back, then flushed as U+FFFD.
    detok = IncrementalDetokenizer(ours)
    lead_byte = ours.token_to_id("<0xF0>") or ours.token_to_id(bytes_to_unicode()[0xF0])  # starts a 4-byte character
    assert detok.step(lead_byte) == ""
    assert detok.flush() == "\ufffd"


def test_from_hf_dir(pair, tmp_path):
    _, ours, hf = pair
    hf.save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    for text in CORPUS:
        for add_special_tokens in (True, False):
            assert loaded.encode(text, add_special_tokens) == _hf_ids(hf, loaded, text, add_special_tokens), repr(text[:80])
    ids = ours.encode(CORPUS[5] + CORPUS[13])
    assert loaded.decode(ids) == ours.decode(ids)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.add_bos) == (
        ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.add_bos)
    assert loaded.chat_template == ours.chat_template
    assert loaded.eog_token_ids >= {ours.eos_token_id}


# -- tiny synthetic vocabularies: always run --------------------------------------


def tiny_gpt2_metadata() -> dict:
    alphabet = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_end|>"] + [alphabet[b] for b in range(256)] + ["Ġh", "Ġhi", "hi"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["Ġ h", "Ġh i", "h i"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": "{{ messages }}",
    }


def tiny_llama_metadata() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "h", "i", "hi", "▁hi"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 5,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def test_tiny_byte_level():
    tok = Tokenizer.from_gguf(tiny_gpt2_metadata())
    ids = tok.encode(" hi<|im_end|>")
    assert [tok.id_to_token(i) for i in ids] == ["Ġhi", "<|im_end|>"]
    assert tok.decode(ids) == " hi" and tok.decode(ids, skip_special_tokens=False) == " hi<|im_end|>"
    assert not tok.add_bos and tok.eog_token_ids == {0, 1}
    assert tok.decode(tok.encode("é ü 日")) == "é ü 日"


def test_tiny_sentencepiece():
    tok = Tokenizer.from_gguf(tiny_llama_metadata())
    assert tok.add_bos  # a SentencePiece vocabulary adds BOS unless it says otherwise
    ids = tok.encode("hi hi")
    assert ids[0] == 1 and [tok.id_to_token(i) for i in ids[1:]] == ["▁hi", "▁hi"]
    assert tok.decode(ids) == "hi hi"
    assert tok.decode(tok.encode("ü")) == "ü"  # byte fallback
    # The decoder strips the prefix space of a text, not of a token streamed after a prompt.
    body = tok.encode("hi hi ü", add_special_tokens=False)
    assert "".join(_stream(tok, body)) == tok.decode(body) == "hi hi ü"
    assert "".join(_stream(tok, body, prompt=tok.encode("hi"))) == " hi hi ü"


class _CountingBackend:
    """A tokenizers backend whose ``decode`` calls are counted (everything else passes through)."""

    def __init__(self, backend):
        self.backend, self.decodes = backend, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decodes += 1
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.mark.parametrize("metadata", [tiny_gpt2_metadata, tiny_llama_metadata])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_decodes_a_single_token_once(metadata, skip_special_tokens):
    """Streaming text decodes each token's left context (the token before it, alone) from the
    tokenizer's kept texts (``Tokenizer.decode_token``): the deltas are those of the backend's own
    decodes, and once every token is known a token that adds text costs one backend call."""
    tok = Tokenizer.from_gguf(metadata())
    end = tok.eos_token_id if "<|im_end|>" not in tok.backend.get_vocab() else tok.token_to_id("<|im_end|>")
    ids = (tok.encode("hi hi ü hi", add_special_tokens=False) + [end]) * 3
    reference = Tokenizer.from_gguf(metadata())
    reference.decode_token = lambda token_id, skip=True: reference.backend.decode([token_id], skip_special_tokens=skip)
    assert _stream(tok, ids, skip=skip_special_tokens) == _stream(reference, ids, skip=skip_special_tokens)
    for token_id in set(ids):
        assert tok.decode_token(token_id, skip_special_tokens) == tok.decode([token_id], skip_special_tokens)
    words = tok.encode(" hi" * 8, add_special_tokens=False)  # every token adds text
    tok.backend = counting = _CountingBackend(tok.backend)
    assert "".join(_stream(tok, words, skip=skip_special_tokens)) == tok.decode(words, skip_special_tokens)
    assert counting.decodes == len(words) + 1  # (+1: the first step's empty left context)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
        (lambda m: m.update({"tokenizer.ggml.model": "bert"}), "not supported"),
        (lambda m: m.pop("tokenizer.ggml.model"), "no tokenizer"),
        (lambda m: m.update({"tokenizer.ggml.token_type": [1, 1]}), "token_type"),
        (lambda m: m.update({"tokenizer.ggml.merges": ["Ġh"]}), "merge"),
        (lambda m: m.update({"tokenizer.ggml.merges": ["Ġ zz"]}), "inconsistent"),
        (lambda m: m.update({"tokenizer.ggml.eos_token_id": 10**6}), "eos_token_id"),
        (lambda m: m.update({"tokenizer.chat_template": 3}), "chat_template"),
    ],
)
def test_malformed_metadata(change, message):
    metadata = tiny_gpt2_metadata()
    change(metadata)
    with pytest.raises(ModelFormatError, match=message):
        Tokenizer.from_gguf(metadata)


def test_pre_tokenizer_splits_match_transformers():
    """For every ``tokenizer.ggml.pre`` both know, our split of a byte-level text equals transformers'."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from cholla.tokenizer.gguf_vocab import PRE_TOKENIZER_SPLITS, byte_level_pre_tokenizer

    text = "I'LL pay $1234.56 for\n\n  3 ½ cafés—ok?!  \tDon't 日本語 x²\r\n"
    shared = sorted(set(PRE_TOKENIZER_SPLITS) & set(GGUF_PRE_TOKENIZER_SPLITS))
    assert {"llama-bpe", "llama3", "qwen2", "gpt-4o", "tekken"} <= set(shared)
    for name in shared:
        reference = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[name]), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        assert byte_level_pre_tokenizer(name).pre_tokenize_str(text) == reference.pre_tokenize_str(text), name
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    assert byte_level_pre_tokenizer("default").pre_tokenize_str(text) == gpt2
    assert byte_level_pre_tokenizer("some-new-model").pre_tokenize_str(text) == gpt2
    pieces = [piece for piece, _ in byte_level_pre_tokenizer("smollm").pre_tokenize_str(text)]
    assert "1" in pieces and "2" in pieces and "Ġ$" in pieces
