"""The model's vocabulary: text ↔ token ids, special tokens, and which ids end a generation.

The ``tokenizers`` library does the actual work (BPE, normalizers, pre-tokenizers,
decoders, added tokens). This module builds it from a GGUF file's metadata or a
Hugging Face folder and adds what an inference engine needs on top: BOS handling,
end-of-generation ids and the chat template string.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from cholla.errors import ModelFormatError, ModelNotFoundError
from cholla.tokenizer.gguf_vocab import backend_from_gguf

# Tokens that end a turn in some model family. llama.cpp treats each as end-of-generation
# when the vocabulary has it (``llama_vocab::impl::load``, "special_eog_ids").
EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})
# GGUF keys whose token id, when present, also ends a generation.
# Texts at least this long are encoded with the GIL released, so a server's other threads keep running.
LONG_TEXT = 4096
EOG_ID_KEYS = ("eos_token_id", "eot_token_id", "eom_token_id", "fim_pad_token_id", "fim_rep_token_id", "fim_sep_token_id")


class Tokenizer:
    """Encode and decode text for one model.

    Build it with ``from_gguf(metadata)`` or ``from_hf_dir(path)``. Special tokens written
    in the text (``<|im_start|>``, ``<start_of_turn>``) encode to their single id.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        eog_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        vocab_size: int | None = None,
    ):
        self.backend = backend
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self.chat_template = chat_template or None
        self.vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        eog = {i for i in eog_token_ids if i is not None}
        if eos_token_id is not None:
            eog.add(eos_token_id)
        for text in EOG_TOKEN_TEXTS:
            token_id = backend.token_to_id(text)
            if token_id is not None:
                eog.add(token_id)
        self.eog_token_ids: set[int] = eog
        added = backend.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        # Every special token's text, e.g. to spot a chat format (``<start_of_turn>``).
        self.special_tokens: list[str] = [added[i].content for i in sorted(self.special_token_ids)]
        # What the post-processor puts around a text is what the model asks for.
        empty = backend.encode("", add_special_tokens=True).ids
        self.add_bos = bos_token_id is not None and empty[:1] == [bos_token_id]
        self.add_eos = eos_token_id is not None and empty[-1:] == [eos_token_id] and not (self.add_bos and len(empty) == 1)
        # decode_token's texts by id: [skip_special_tokens][id]
        self._token_texts: tuple[dict[int, str], dict[int, str]] = ({}, {})

    # -- construction -----------------------------------------------------------

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From ``GGUFFile.metadata``: llama.cpp's ``tokenizer.ggml.*`` keys and ``tokenizer.chat_template``."""
        backend, num_tokens = backend_from_gguf(metadata)

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not isinstance(value, int) or not 0 <= value < num_tokens:
                raise ModelFormatError(f"tokenizer.ggml.{key} = {value!r} is not a token id below {num_tokens}; the file is corrupt")
            return value

        bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama"))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _template_processor(backend, bos if add_bos else None, eos if add_eos else None)
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ModelFormatError("GGUF metadata 'tokenizer.chat_template' is not a string; the file is corrupt")
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=token_id("padding_token_id"),
            unk_token_id=token_id("unknown_token_id"),
            eog_token_ids=[token_id(key) for key in EOG_ID_KEYS],
            chat_template=template,
            vocab_size=num_tokens,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """From a Hugging Face folder: ``tokenizer.json`` plus ``tokenizer_config.json`` (and the chat template files)."""
        path = Path(path)
        if not path.is_dir():
            raise ModelNotFoundError(f"model folder not found: {path}")
        if not (path / "tokenizer.json").exists():
            raise ModelFormatError(
                f"{path} has no tokenizer.json; cholla reads only fast-tokenizer files (save one with transformers' "
                "AutoTokenizer.from_pretrained(...).save_pretrained(...))"
            )
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ModelFormatError(f"{path / 'tokenizer.json'} is not a valid tokenizers file ({e})") from None
        config = _read_json(path / "tokenizer_config.json")

        # Added tokens the config lists but tokenizer.json lacks (transformers adds them too).
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        for index, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if isinstance(entry, dict) and entry.get("content") not in known:
                token = AddedToken(entry["content"], single_word=entry.get("single_word", False),
                                   lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                                   normalized=entry.get("normalized", True), special=entry.get("special", False))
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])

        def special(name: str) -> int | None:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if not isinstance(value, str):
                return None
            token_id = backend.token_to_id(value)
            if token_id is None:
                raise ModelFormatError(f"{path}: {name} {value!r} from tokenizer_config.json is not in the vocabulary")
            return token_id

        bos, eos = special("bos_token"), special("eos_token")
        # transformers rebuilds the post-processor when the config sets either flag, or tokenizer.json has none.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            backend.post_processor = _template_processor(
                backend, bos if config.get("add_bos_token") else None, eos if config.get("add_eos_token") else None
            )
        generation = _read_json(path / "generation_config.json")
        eos_ids = generation.get("eos_token_id")
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=special("pad_token"),
            unk_token_id=special("unk_token"),
            eog_token_ids=[i for i in eos_ids if isinstance(i, int)],
            chat_template=_hf_chat_template(path, config),
        )

    # -- text <-> ids -------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS/EOS as the model asks.

        A text that already starts with the BOS token gets no second one (``transformers``
        would add it again; llama.cpp warns about it: a doubled BOS degrades the output).
        """
        if len(text) < LONG_TEXT:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:  # encode_batch releases the GIL (encode holds it: ~2 s per MB, every other thread stopped)
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and len(ids) > 1 and ids[1] == self.bos_token_id:
            del ids[0]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int, skip_special_tokens: bool = True) -> str:
        """``decode([token_id])``, kept per id after the first call: the incremental detokenizer
        decodes each generated token alone, as the next token's left context (a dict lookup
        where the backend's call costs microseconds)."""
        texts = self._token_texts[skip_special_tokens]
        text = texts.get(token_id)
        if text is None:
            text = texts[token_id] = self.backend.decode([token_id], skip_special_tokens=skip_special_tokens)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_token_ids

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.id_to_token(self.eos_token_id)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos={self.add_bos}, eog={sorted(self.eog_token_ids)})")


def _template_processor(backend: Backend, bos: int | None, eos: int | None):
    """A post-processor that puts BOS before and EOS after each sequence (either may be absent)."""
    specials = [(backend.id_to_token(i), i) for i in (bos, eos) if i is not None]
    before = f"{backend.id_to_token(bos)}:0 " if bos is not None else ""
    after = f" {backend.id_to_token(eos)}:0" if eos is not None else ""
    single = f"{before}$A:0{after}"
    pair = f"{single} {before.replace(':0', ':1')}$B:1{after.replace(':0', ':1')}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _hf_chat_template(path: Path, config: dict) -> str | None:
    """``chat_template.jinja``, else ``chat_template.json``, else ``tokenizer_config.json``'s (the default one of a list)."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
