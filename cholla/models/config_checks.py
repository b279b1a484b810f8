"""A model's config checked in one place, before any weight or cache is allocated.

A file that contradicts itself (a zero head count, heads that do not divide the
hidden size, a layer count the tensors do not have) would otherwise fail deep in
model construction, as a ``ZeroDivisionError`` or after gigabytes of allocation.
Here each contradiction is a ``ModelFormatError`` that names the key at fault.

Two stages: ``check_raw_*`` looks at the metadata's types before
``config_from_gguf`` / ``config_from_hf`` convert them, and ``CHECKS`` (small
functions, each one rule; append to extend) look at the built ``ModelConfig``
against the tensors' shapes. ``gguf_config`` and ``hf_config`` run both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cholla.errors import ModelFormatError
from cholla.formats.gguf import GGUFFile
from cholla.formats.safetensors import HFFolder
from cholla.models.config import (LAYER_TYPES, ModelConfig, RopeConfig, config_from_gguf, config_from_hf)
from cholla.models.gguf_names import gguf_to_hf_name
from cholla.models.mamba2 import backbone_names

# Beyond these no real model goes; a file that claims more is corrupt (and would allocate without bound).
MAX_DIM = 1 << 20  # hidden, intermediate, head dims
MAX_HEADS = 1 << 12
MAX_LAYERS = 1 << 12
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24
MAX_EXPERTS = 1 << 16

# ModelConfig field -> GGUF key (after "{arch}.") and config.json key, for messages and the raw checks.
GGUF_KEYS = {
    "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length", "num_layers": "block_count",
    "num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon", "max_position_embeddings": "context_length",
    "vocab_size": "vocab_size", "rope": "rope.freq_base", "rope_scaling": "rope.scaling.factor",
    "sliding_window": "attention.sliding_window", "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id", "final_logit_softcapping": "final_logit_softcapping",
    "attn_logit_softcapping": "attn_logit_softcapping", "num_experts": "expert_count", "top_k": "expert_used_count",
    "kv_lora_rank": "attention.kv_lora_rank", "moe_intermediate_size": "expert_feed_forward_length",
    "deltanet.num_k_heads": "ssm.group_count", "deltanet.num_v_heads": "ssm.time_step_rank",
    "deltanet.k_head_dim": "ssm.state_size", "deltanet.conv_kernel": "ssm.conv_kernel", "rotary_dim": "rope.dimension_count",
    "global_head_dim": "attention.key_length", "kv_shared_layers": "attention.shared_kv_layers",
    "per_layer_input_size": "embedding_length_per_layer_input",
}
HF_KEYS = {
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "rms_norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings", "vocab_size": "vocab_size",
    "rope": "rope_theta", "rope_scaling": "rope_parameters", "sliding_window": "sliding_window",
    "final_logit_softcapping": "final_logit_softcapping", "attn_logit_softcapping": "attn_logit_softcapping",
    "query_pre_attn_scalar": "query_pre_attn_scalar", "layer_types": "layer_types", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id", "top_k": "num_experts_per_tok", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "q_lora_rank": "q_lora_rank", "moe_intermediate_size": "moe_intermediate_size",
    "deltanet.num_k_heads": "linear_num_key_heads", "deltanet.num_v_heads": "linear_num_value_heads",
    "deltanet.k_head_dim": "linear_key_head_dim", "deltanet.v_head_dim": "linear_value_head_dim",
    "deltanet.conv_kernel": "linear_conv_kernel_dim",
    "global_head_dim": "global_head_dim", "global_kv_heads": "num_global_key_value_heads",
    "kv_shared_layers": "num_kv_shared_layers", "per_layer_input_size": "hidden_size_per_layer_input",
    "per_layer_vocab_size": "vocab_size_per_layer_input",
}
# The most each count may be: checked on the raw values too, before anything is sized by them.
_MOST = {"num_layers": MAX_LAYERS, "num_heads": MAX_HEADS, "num_kv_heads": MAX_HEADS, "vocab_size": MAX_VOCAB,
         "max_position_embeddings": MAX_CONTEXT, "hidden_size": MAX_DIM, "intermediate_size": MAX_DIM,
         "head_dim": MAX_DIM, "sliding_window": MAX_CONTEXT, "global_head_dim": MAX_DIM, "global_kv_heads": MAX_HEADS}
_COUNT_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim", "vocab_size",
                 "max_position_embeddings")
_FLOAT_FIELDS = ("rms_norm_eps", "rope", "rope_scaling", "final_logit_softcapping", "attn_logit_softcapping",
                 "query_pre_attn_scalar")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class ConfigSource:
    """What the checks compare a config against: the file, its key names, its tensors' shapes (HF names)."""

    path: str
    keys: Mapping[str, str]  # ModelConfig field -> the key it was read from
    shapes: dict[str, tuple[int, ...]]  # torch order, rows first
    num_tokens: int | None = None  # entries in the tokenizer's vocabulary, when the file has one

    def fail(self, field: str, value: Any, problem: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ModelFormatError(f"{self.path}: {self.keys.get(field, field)} = {shown} {problem}; "
                               "the file is corrupt or was written wrongly")


Check = Callable[[ModelConfig, ConfigSource], None]


def _gguf_key(arch: str, key: str) -> str:
    return key if key.startswith("tokenizer.") else f"{arch}.{key}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- raw metadata, before conversion ---------------------------------------------------------


def check_raw_gguf(metadata: Mapping[str, Any], path: str) -> None:
    """The types of the GGUF keys ``config_from_gguf`` converts, and the counts it divides by."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{path}: general.architecture = {arch!r} is not a string; the file is corrupt")
    for field, suffix in GGUF_KEYS.items():
        key = _gguf_key(arch, suffix)
        if key not in metadata:
            continue
        value = metadata.get(key)
        if field in ("num_kv_heads", "intermediate_size") and isinstance(value, list):  # per-layer counts
            if not value or not all(_is_int(v) and 0 <= v <= _MOST[field] for v in value):
                raise ModelFormatError(f"{path}: {key} must be a count or a list of counts; the file is corrupt")
            continue
        ok = _is_number(value) if field in _FLOAT_FIELDS else _is_int(value)
        if not ok:
            raise ModelFormatError(f"{path}: {key} = {str(value)[:60]!r} is not a finite number; the file is corrupt")
        lowest = 0 if field == "sliding_window" else 1  # some are divided by before the config exists
        if arch == "mamba2" and field in ("num_heads", "intermediate_size"):
            lowest = 0  # no attention, no MLP: the converter writes zeros
        if field in _MOST and not lowest <= value <= _MOST[field]:
            raise ModelFormatError(f"{path}: {key} = {value} must be a whole number in [{lowest}, {_MOST[field]}]; "
                                   "the file is corrupt")
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling is not None and not isinstance(scaling, str):
        raise ModelFormatError(f"{path}: {arch}.rope.scaling.type = {scaling!r} is not a string; the file is corrupt")


def check_raw_hf(config: Mapping[str, Any], path: str) -> None:
    """The types of the config.json keys ``config_from_hf`` converts."""
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: config.json holds a {type(config).__name__}, not an object")
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    for field, key in HF_KEYS.items():
        value = config.get(key)
        if value is None or field in ("rope_scaling", "layer_types"):
            continue
        if not (_is_number(value) if field in _FLOAT_FIELDS else _is_int(value)):
            raise ModelFormatError(f"{path}: config.json's {key} = {str(value)[:60]!r} is not a finite number")
        lowest = 0 if field == "sliding_window" else 1
        if field in _MOST and not lowest <= value <= _MOST[field]:
            raise ModelFormatError(f"{path}: config.json's {key} = {value} must be a whole number in [{lowest}, {_MOST[field]}]")
    for key in ("rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ModelFormatError(f"{path}: config.json's {key} must be an object")
    eos = config.get("eos_token_id")
    if eos is not None and not (_is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))):
        raise ModelFormatError(f"{path}: config.json's eos_token_id = {eos!r} is not a token id or a list of them")


# -- the built config, against the tensors ----------------------------------------------------


def check_counts(config: ModelConfig, source: ConfigSource) -> None:
    for field in (*_COUNT_FIELDS, "num_kv_heads"):
        value, most = getattr(config, field), _MOST[field]
        if not _is_int(value) or not 1 <= value <= most:
            source.fail(field, value, f"must be a whole number in [1, {most}]")


def check_heads(config: ModelConfig, source: ConfigSource) -> None:
    if config.num_heads % config.num_kv_heads:
        source.fail("num_kv_heads", config.num_kv_heads, f"does not divide the {config.num_heads} attention heads")
    if config.head_dim % 2:
        source.fail("head_dim", config.head_dim, "is odd; rotary embeddings rotate pairs of dimensions")


def check_norm(config: ModelConfig, source: ConfigSource) -> None:
    if not (_is_number(config.rms_norm_eps) and 0 < config.rms_norm_eps < 1):
        source.fail("rms_norm_eps", config.rms_norm_eps, "must be a number in (0, 1)")


def _check_rope(rope: RopeConfig, source: ConfigSource, field: str) -> None:
    if not (_is_number(rope.theta) and rope.theta > 1):
        source.fail(field, rope.theta, "must be a rope base > 1")
    scaling = rope.scaling or {}
    kind = scaling.get("rope_type", "default")
    needs = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}.get(kind, ())
    for name in needs:
        value = scaling.get(name)
        if not (_is_number(value) and value > 0):
            source.fail("rope_scaling", value, f"({kind} rope scaling's {name}) must be a number > 0")
    if kind == "proportional":
        part = scaling.get("partial_rotary_factor", 1.0)
        if not (_is_number(part) and 0 <= part <= 1):
            source.fail("rope_scaling", part, "(proportional rope's partial_rotary_factor) must be a number in [0, 1]")
    if kind == "llama3":
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        if not (_is_number(low) and _is_number(high) and 0 < low < high):
            source.fail("rope_scaling", (low, high), "(llama3 low_freq_factor, high_freq_factor) must have 0 < low < high")


def check_rope(config: ModelConfig, source: ConfigSource) -> None:
    _check_rope(config.rope, source, "rope")
    if config.local_rope is not None:
        _check_rope(config.local_rope, source, "rope")
    factors = source.shapes.get("rope_freqs.weight")
    rotated = config.global_head_dim or config.head_dim  # the factors belong to config.rope, the global layers'
    if factors is not None and factors != (rotated // 2,):
        source.fail("head_dim", rotated, f"needs {rotated // 2} rope frequency factors, "
                                         f"but rope_freqs.weight has shape {factors}")


def check_layer_kinds(config: ModelConfig, source: ConfigSource) -> None:
    if len(config.layer_types) != config.num_layers:
        source.fail("layer_types", len(config.layer_types), f"layer kinds do not match the {config.num_layers} layers")
    if any(kind not in LAYER_TYPES for kind in config.layer_types):
        source.fail("layer_types", config.layer_types, f"may hold only {', '.join(map(repr, LAYER_TYPES))}")
    if config.state_shapes and len(config.state_shapes) != config.num_layers:
        source.fail("layer_types", len(config.state_shapes), f"recurrent states do not match the {config.num_layers} layers")
    if config.sliding_window is not None and not (_is_int(config.sliding_window) and 1 <= config.sliding_window <= MAX_CONTEXT):
        source.fail("sliding_window", config.sliding_window, f"must be a whole number in [1, {MAX_CONTEXT}]")
    for field in ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
        value = getattr(config, field)
        if value is not None and not (_is_number(value) and value > 0):
            source.fail(field, value, "must be a number > 0")


def check_layers_present(config: ModelConfig, source: ConfigSource) -> None:
    """The layer count must be the number of layers the tensors hold, no more, no fewer."""
    present = {int(m.group(1)) for name in source.shapes if (m := _LAYER.match(name))}
    if present != set(range(config.num_layers)):
        held = f"layers 0-{max(present)}" if present and present == set(range(max(present) + 1)) else f"{len(present)} layers"
        source.fail("num_layers", config.num_layers, f"but the file holds tensors for {held}")


def check_embedding(config: ModelConfig, source: ConfigSource) -> None:
    """The vocabulary and hidden size against the embedding (and output head), and the tokenizer's size."""
    shape = source.shapes.get("model.embed_tokens.weight")
    if shape is None:
        raise ModelFormatError(f"{source.path}: the file has no token embedding tensor; it is incomplete")
    if len(shape) != 2 or shape[1] != config.hidden_size:
        source.fail("hidden_size", config.hidden_size, f"but the token embedding has shape {shape}")
    if shape[0] != config.vocab_size:
        source.fail("vocab_size", config.vocab_size, f"but the token embedding has {shape[0]} rows")
    head = source.shapes.get("lm_head.weight")
    if head is not None and head != shape:
        source.fail("vocab_size", config.vocab_size, f"but the output head has shape {head}, the embedding {shape}")
    if source.num_tokens is not None and source.num_tokens > config.vocab_size:
        source.fail("vocab_size", config.vocab_size, f"but the tokenizer has {source.num_tokens} tokens")


def check_special_tokens(config: ModelConfig, source: ConfigSource) -> None:
    for name, ids in (("bos_token_id", [config.bos_token_id]), ("eos_token_id", config.eos_token_ids)):
        bad = [i for i in ids if i is not None and not (_is_int(i) and 0 <= i < config.vocab_size)]
        if bad:
            source.fail(name, bad[0], f"is not a token id of the {config.vocab_size}-token vocabulary")


def _attention_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[tuple[int, int], str]]:
    """Layer ``layer``'s attention weight -> (its shape, the field that sizes it): grouped-query or latent (MLA)."""
    hidden, mla = config.hidden_size, config.mla
    if mla is None:
        kv_heads, head_dim = config.layer_attention(layer)
        q, kv = config.num_heads * head_dim, kv_heads * head_dim
        q_rows = 2 * q if config.attn_output_gate else q  # a gate per head after its query
        return {"q_proj": ((q_rows, hidden), "num_heads"), "k_proj": ((kv, hidden), "num_kv_heads"),
                "v_proj": ((kv, hidden), "num_kv_heads"), "o_proj": ((hidden, q), "num_heads")}
    q = config.num_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    return {"q_proj": ((q, hidden), "num_heads"), "q_b_proj": ((q, mla.q_lora_rank or 0), "num_heads"),
            "kv_a_proj_with_mqa": ((mla.kv_lora_rank + mla.qk_rope_head_dim, hidden), "kv_lora_rank"),
            "o_proj": ((hidden, config.num_heads * mla.v_head_dim), "num_heads")}


def check_layer_shapes(config: ModelConfig, source: ConfigSource) -> None:
    """Every layer's attention and dense MLP weights against the head counts and dimensions
    (routed experts are checked against the config as the loader takes them)."""
    hidden = config.hidden_size
    for layer in range(config.num_layers):
        inner = config.layer_intermediate_size(layer)
        expected = {f"self_attn.{name}.weight": shape for name, shape in _attention_shapes(config, layer).items()}
        expected.update({
            "mlp.gate_proj.weight": ((inner, hidden), "intermediate_size"),
            "mlp.up_proj.weight": ((inner, hidden), "intermediate_size"),
            "mlp.down_proj.weight": ((hidden, inner), "intermediate_size"),
        })
        for part, (want, field) in expected.items():
            got = source.shapes.get(f"model.layers.{layer}.{part}")
            if got is not None and got != want:
                owner = config.mla if field == "kv_lora_rank" else config
                source.fail(field, getattr(owner, field), f"with the other dimensions needs {part.split('.')[-2]} "
                                                          f"of layer {layer} to be {want}, but it is {got}")


def check_experts(config: ModelConfig, source: ConfigSource) -> None:
    """A mixture of experts' counts: each token routed to 1..num_experts of them, in whole groups."""
    moe = config.moe
    if moe is None:
        return
    if not (_is_int(moe.num_experts) and 1 <= moe.num_experts <= MAX_EXPERTS):
        source.fail("num_experts", moe.num_experts, f"must be a whole number in [1, {MAX_EXPERTS}]")
    if not (_is_int(moe.top_k) and 1 <= moe.top_k <= moe.num_experts):
        source.fail("top_k", moe.top_k, f"must route each token to between 1 and the {moe.num_experts} experts")
    if not (_is_int(moe.intermediate_size) and 1 <= moe.intermediate_size <= MAX_DIM):
        source.fail("moe_intermediate_size", moe.intermediate_size, f"must be a whole number in [1, {MAX_DIM}]")
    if not (_is_int(moe.shared_intermediate_size) and 0 <= moe.shared_intermediate_size <= MAX_DIM):
        source.fail("shared_intermediate_size", moe.shared_intermediate_size, f"must be a whole number in [0, {MAX_DIM}]")
    if not (1 <= moe.num_groups and moe.num_experts % moe.num_groups == 0 and 1 <= moe.groups_used <= moe.num_groups):
        source.fail("num_groups", (moe.num_groups, moe.groups_used),
                    f"(expert groups, groups used) must divide the {moe.num_experts} experts, using 1 to all groups")
    if any(not (_is_int(i) and 0 <= i < config.num_layers) for i in moe.dense_layers):
        source.fail("dense_layers", moe.dense_layers, f"must be layers of the {config.num_layers}")


def check_mamba(config: ModelConfig, source: ConfigSource) -> None:
    """The Mamba-2 mixers' dimensions: whole and bounded, and their projections the sizes they imply."""
    shape = config.mamba
    if shape is None:
        return
    for name in ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel", "chunk_size"):
        value = getattr(shape, name)
        if not (_is_int(value) and 1 <= value <= MAX_DIM):
            source.fail(f"mamba {name}", value, f"must be a whole number in [1, {MAX_DIM}]")
    expected = {"in_proj.weight": (2 * shape.inner_size + 2 * shape.n_groups * shape.state_size + shape.num_heads,
                                   shape.hidden_size),
                "out_proj.weight": (shape.hidden_size, shape.inner_size)}
    for layer in range(config.num_layers):
        for part, want in expected.items():
            got = (source.shapes.get(f"model.layers.{layer}.mixer.{part}")  # Mamba-2, Nemotron-H
                   or source.shapes.get(f"model.layers.{layer}.mamba.{part}"))  # Falcon-H1, Granite 4 hybrid
            if got is not None and tuple(got) != want:
                source.fail("mamba num_heads", shape.num_heads, f"with the other Mamba-2 dimensions needs {part} of "
                                                                f"layer {layer} to be {want}, but it is {tuple(got)}")


def check_latent(config: ModelConfig, source: ConfigSource) -> None:
    """Multi-head latent attention's widths: whole, bounded, and a rope part of whole pairs."""
    mla = config.mla
    if mla is None:
        return
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        value = getattr(mla, name)
        if not (_is_int(value) and 1 <= value <= MAX_DIM):
            source.fail(name, value, f"must be a whole number in [1, {MAX_DIM}]")
    if mla.q_lora_rank is not None and not (_is_int(mla.q_lora_rank) and 0 <= mla.q_lora_rank <= MAX_DIM):
        source.fail("q_lora_rank", mla.q_lora_rank, f"must be a whole number in [0, {MAX_DIM}]")
    if mla.qk_rope_head_dim % 2:
        source.fail("qk_rope_head_dim", mla.qk_rope_head_dim, "is odd; rotary embeddings rotate pairs of dimensions")


def check_deltanet(config: ModelConfig, source: ConfigSource) -> None:
    """Gated DeltaNet's widths (bounded, value heads in whole groups per key head, a conv that
    remembers at least one input), its projections' shapes, and the partial rope's width."""
    rotary = config.rotary_dim
    if rotary is not None and not (_is_int(rotary) and 2 <= rotary <= config.head_dim and rotary % 2 == 0):
        source.fail("rotary_dim", rotary, f"must be an even number of the head's {config.head_dim} dims")
    c = config.deltanet
    if c is None:
        return
    for name in ("num_k_heads", "num_v_heads", "k_head_dim", "v_head_dim"):
        value, most = getattr(c, name), MAX_HEADS if name.endswith("heads") else MAX_DIM
        if not (_is_int(value) and 1 <= value <= most):
            source.fail(f"deltanet.{name}", value, f"must be a whole number in [1, {most}]")
    if c.num_v_heads % c.num_k_heads:
        source.fail("deltanet.num_v_heads", c.num_v_heads, f"must be a multiple of the {c.num_k_heads} key heads")
    if not (_is_int(c.conv_kernel) and 2 <= c.conv_kernel <= 64):
        source.fail("deltanet.conv_kernel", c.conv_kernel, "must be a whole number in [2, 64]")
    hidden, value_dim = config.hidden_size, c.num_v_heads * c.v_head_dim
    expected = {"in_proj_qkv": (c.conv_channels, hidden), "in_proj_z": (value_dim, hidden),
                "in_proj_b": (c.num_v_heads, hidden), "in_proj_a": (c.num_v_heads, hidden),
                "in_proj_qkvz": (c.conv_channels + value_dim, hidden), "in_proj_ba": (2 * c.num_v_heads, hidden),
                "out_proj": (hidden, value_dim)}
    for layer in range(config.num_layers):
        for part, want in expected.items():
            got = source.shapes.get(f"model.layers.{layer}.linear_attn.{part}.weight")
            if got is not None and got != want:
                source.fail("deltanet.num_v_heads", c.num_v_heads,
                            f"with the other dimensions needs {part} of layer {layer} to be {want}, but it is {got}")


def check_layer_geometry(config: ModelConfig, source: ConfigSource) -> None:
    """Gemma 4's per-kind heads, KV sharing and per-layer embeddings: whole, bounded, and every
    KV-shared layer with an earlier layer of its kind to read from."""
    for field in ("global_head_dim", "global_kv_heads"):
        value = getattr(config, field)
        if value is not None and not (_is_int(value) and 1 <= value <= _MOST[field]):
            source.fail(field, value, f"must be a whole number in [1, {_MOST[field]}]")
    kv_heads, head_dim = config.global_kv_heads or config.num_kv_heads, config.global_head_dim or config.head_dim
    if config.num_heads % kv_heads or head_dim % 2:
        source.fail("global_head_dim", (kv_heads, head_dim), f"(full-attention KV heads, head dim) must divide the "
                                                              f"{config.num_heads} heads and be even")
    shared = config.kv_shared_layers
    if not (_is_int(shared) and 0 <= shared < config.num_layers):
        source.fail("kv_shared_layers", shared, f"must be a whole number in [0, {config.num_layers - 1}]")
    orphans = [i for i in range(config.num_layers) if config.kv_producer(i) < 0]
    if orphans:
        source.fail("kv_shared_layers", shared, f"leaves layer {orphans[0]} no earlier {config.layer_types[orphans[0]]} "
                                                "layer to share keys and values with")
    size, vocab = config.per_layer_input_size, config.per_layer_vocab_size
    if not (_is_int(size) and 0 <= size <= MAX_DIM):
        source.fail("per_layer_input_size", size, f"must be a whole number in [0, {MAX_DIM}]")
    if size and vocab is not None and not (_is_int(vocab) and config.vocab_size <= vocab <= MAX_VOCAB):
        source.fail("per_layer_vocab_size", vocab, f"must cover the {config.vocab_size}-token vocabulary")
    shape = source.shapes.get("model.embed_tokens_per_layer.weight")
    if (shape is not None) != bool(size) or (shape is not None and shape[1:] != (config.num_layers * size,)):
        source.fail("per_layer_input_size", size, f"with {config.num_layers} layers does not fit the per-layer "
                                                  f"embedding model.embed_tokens_per_layer.weight of shape {shape}")


CHECKS: list[Check] = [check_counts, check_heads, check_experts, check_latent, check_mamba, check_norm, check_rope, check_layer_kinds,
                       check_layer_geometry, check_layers_present, check_embedding, check_special_tokens,
                       check_layer_shapes, check_deltanet]


def check_config(config: ModelConfig, source: ConfigSource) -> None:
    """Run every check in ``CHECKS``; the first contradiction raises ``ModelFormatError``."""
    for check in CHECKS:
        check(config, source)


# -- the two formats ------------------------------------------------------------------------


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """The config of a GGUF file, checked against its metadata types and tensors."""
    path = str(gguf.path)
    check_raw_gguf(gguf.metadata, path)
    config = config_from_gguf(gguf.metadata, set(gguf.tensors), {n: tuple(t.shape) for n, t in gguf.tensors.items()})
    shapes = {}
    for name, tensor in gguf.tensors.items():
        shapes[gguf_to_hf_name(name, config.architecture) or name] = tensor.shape
    keys = {field: _gguf_key(gguf.architecture, key) for field, key in GGUF_KEYS.items()}
    check_config(config, ConfigSource(path, keys, shapes, gguf.metadata.array_length("tokenizer.ggml.tokens")))
    return config


def _text_tower(name: str) -> str:
    """A multimodal checkpoint's text-model tensor under its text-only name
    (``language_model.model.*``, Gemma 4's ``model.language_model.*``)."""
    return name.replace("model.language_model.", "model.", 1) if name.startswith("model.language_model.") \
        else name.removeprefix("language_model.")


def hf_config(folder: HFFolder) -> ModelConfig:
    """The config of a Hugging Face folder, checked against config.json's types and the shards' headers."""
    path = str(folder.path)
    check_raw_hf(folder.config, path)
    config = config_from_hf(folder.config)
    shapes = backbone_names({_text_tower(name): shape for name, shape in folder.tensor_shapes().items()})
    keys = {field: f"config.json's {key}" for field, key in HF_KEYS.items()}
    check_config(config, ConfigSource(path, keys, shapes))
    return config
