"""GGUF tensor names -> Hugging Face names, in one place for every architecture.

Models are written against HF names; a GGUF checkpoint is renamed on load.
"""

from __future__ import annotations

import re

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixtures of experts (layers/moe.py): the router, stacked experts, the shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}

# Gated DeltaNet hybrids (layers/gated_deltanet.py). ssm_a is llama.cpp's -exp(A_log), which our layer
# keeps as ``A``; qwen3next's ssm_ba (b and a rows interleaved per key head) is split by the model.
_DELTANET = {
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_ba": "linear_attn.in_proj_ba",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_a": "linear_attn.A",
    "ssm_dt": "linear_attn.dt_bias",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}

# Gemma names the norm after attention "post" and the one before the MLP "pre".
_LAYER_OVERRIDES = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    # LFM2: HF's own names (models/lfm2.py renames them); its conv layers' tensors are ``shortconv.*``.
    "lfm2": {
        "attn_norm": "operator_norm",
        "ffn_norm": "ffn_norm",
        "ffn_gate": "feed_forward.w1",
        "ffn_up": "feed_forward.w3",
        "ffn_down": "feed_forward.w2",
        "attn_output": "self_attn.out_proj",
        "attn_q_norm": "self_attn.q_layernorm",
        "attn_k_norm": "self_attn.k_layernorm",
        "shortconv.conv": "conv.conv",
        "shortconv.in_proj": "conv.in_proj",
        "shortconv.out_proj": "conv.out_proj",
    },
    "gpt_oss": {"post_attention_norm": "post_attention_layernorm", "attn_sinks": "self_attn.sinks"},
    "qwen3_next": _DELTANET,
    "qwen3_5": _DELTANET,
    "qwen3_5_moe": _DELTANET,
    "deepseek_v3": {
        "attn_q_a": "self_attn.q_a_proj",
        "attn_q_a_norm": "self_attn.q_a_layernorm",
        "attn_q_b": "self_attn.q_b_proj",
        "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
        "attn_kv_a_norm": "self_attn.kv_a_layernorm",
        "attn_kv_b": "self_attn.kv_b_proj",  # older conversions: not yet split per head
        "attn_k_b": "self_attn.k_b",
        "attn_v_b": "self_attn.v_b",
        "exp_probs_b": "mlp.e_score_correction_bias",
    },
}

# Bare tensors (layers.linear.DenseTensor), named after their module without ".weight".
_BARE = {"attn_sinks", "attn_k_b", "attn_v_b", "exp_probs_b", "ssm_a", "ssm_dt"}

_BLOCK = re.compile(r"blk\.(\d+)\.([\w.]+?)(?:\.(weight|bias))?$")  # (ssm_a has no suffix)
# Whole-model tensors some architectures name otherwise.
_GLOBAL_OVERRIDES = {"lfm2": {"token_embd_norm.weight": "model.embedding_norm.weight"}}


def gguf_to_hf_name(name: str, architecture: str) -> str | None:
    """The HF name for a GGUF tensor, or None if no model module takes it."""
    globals_ = {**_GLOBAL, **_GLOBAL_OVERRIDES.get(architecture, {})}
    if name in globals_:
        return globals_[name]
    match = _BLOCK.match(name)
    if not match:
        return None
    layer, part, kind = match.groups()
    table = {**_LAYER, **_LAYER_OVERRIDES.get(architecture, {})}
    if part not in table:
        return None
    if part in _BARE:
        return f"model.layers.{layer}.{table[part]}"
    if kind is None:
        return None
    return f"model.layers.{layer}.{table[part]}.{kind}"
