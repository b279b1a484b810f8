"""GGUF tensor names -> Hugging Face names, in one place for every architecture.

Models are written against HF names; a GGUF checkpoint is renamed on load.
"""

from __future__ import annotations

import re

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    # Gemma 4's per-layer embeddings
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
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

# LFM2 and LFM2-MoE: HF's own names (models/lfm2.py renames them); conv layers' tensors are ``shortconv.*``.
_LFM2 = {
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
    # LFM2-MoE: its router, expert bias and stacked experts (split per expert on load)
    "ffn_gate_inp": "feed_forward.gate",
    "exp_probs_b": "feed_forward.expert_bias",
    "ffn_gate_exps": "feed_forward.experts.w1",
    "ffn_up_exps": "feed_forward.experts.w3",
    "ffn_down_exps": "feed_forward.experts.w2",
}

def _mamba2(module: str) -> dict[str, str]:
    """llama.cpp's Mamba-2 mixer tensors, under the mixer's HF module name."""
    return {"ssm_in": f"{module}.in_proj", "ssm_conv1d": f"{module}.conv1d", "ssm_dt": f"{module}.dt_bias",
            "ssm_a": f"{module}.A", "ssm_d": f"{module}.D", "ssm_norm": f"{module}.norm", "ssm_out": f"{module}.out_proj"}


# Gemma names the norm after attention "post" and the one before the MLP "pre".
_LAYER_OVERRIDES = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "gemma4": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "post_ffw_norm_1": "post_feedforward_layernorm_1",
        "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
        "post_ffw_norm_2": "post_feedforward_layernorm_2",
        "layer_output_scale": "layer_scalar",
        "inp_gate": "per_layer_input_gate",
        "proj": "per_layer_projection",
        "post_norm": "post_per_layer_input_norm",
        "ffn_gate_inp": "router.proj",
        "ffn_gate_inp.scale": "router.scale",
        "ffn_down_exps.scale": "router.per_expert_scale",
        "ffn_gate_up_exps": "experts.gate_up_proj",  # split into gate and up by models/gemma4.py
        "ffn_down_exps": "moe.experts.down_proj",
    },
    "lfm2": _LFM2,
    "lfm2_moe": _LFM2,
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
    # Mamba-2 and Nemotron-H: one mixer per layer under one norm
    **{arch: {
        "attn_norm": "norm", "ssm_in": "mixer.in_proj", "ssm_conv1d": "mixer.conv1d", "ssm_dt": "mixer.dt_bias",
        "ssm_a": "mixer.A", "ssm_d": "mixer.D", "ssm_norm": "mixer.norm", "ssm_out": "mixer.out_proj",
        "attn_q": "mixer.q_proj", "attn_k": "mixer.k_proj", "attn_v": "mixer.v_proj", "attn_output": "mixer.o_proj",
        "ffn_up": "mixer.up_proj", "ffn_down": "mixer.down_proj", "ffn_gate_inp": "mixer.gate",
        "ffn_up_exps": "mixer.experts.up_proj", "ffn_down_exps": "mixer.experts.down_proj",
        "ffn_up_shexp": "mixer.shared_expert.up_proj", "ffn_down_shexp": "mixer.shared_expert.down_proj",
        "exp_probs_b": "mixer.e_score_correction_bias",
    } for arch in ("mamba2", "nemotron_h")},
    "falcon_h1": {**_mamba2("mamba"), "ffn_norm": "pre_ff_layernorm", "ffn_gate": "feed_forward.gate_proj",
                  "ffn_up": "feed_forward.up_proj", "ffn_down": "feed_forward.down_proj"},
    "granitemoehybrid": {
        **_mamba2("mamba"),
        **{f"ffn_{proj}{suffix}": f"shared_mlp.{proj}_proj" for proj in ("gate", "up", "down") for suffix in ("", "_shexp")},
        **{f"ffn_{proj}_exps": f"block_sparse_moe.experts.{proj}_proj" for proj in ("gate", "up", "down")},
        "ffn_gate_inp": "block_sparse_moe.gate",
    },
}

# Bare tensors (layers.linear.DenseTensor, HF's fused experts), named after their module without ".weight".
_BARE = {"attn_sinks", "attn_k_b", "attn_v_b", "exp_probs_b", "layer_output_scale", "ffn_gate_up_exps",
         "ffn_gate_inp.scale", "ffn_down_exps.scale", "ssm_a", "ssm_d", "ssm_dt"}
# Weights llama.cpp's converter writes without their ".weight".
_NO_SUFFIX = {("falcon_h1", "ffn_norm")}

# Mamba-2's ssm_a and ssm_d have no suffix; Gemma 4's router scales are ".scale"
_BLOCK = re.compile(r"blk\.(\d+)\.([\w.]+?)(?:\.(weight|bias|scale))?$")
# Whole-model tensors some architectures name otherwise.
_LFM2_GLOBAL = {"token_embd_norm.weight": "model.embedding_norm.weight"}  # its final norm
_GLOBAL_OVERRIDES = {"lfm2": _LFM2_GLOBAL, "lfm2_moe": _LFM2_GLOBAL}


def gguf_to_hf_name(name: str, architecture: str) -> str | None:
    """The HF name for a GGUF tensor, or None if no model module takes it."""
    globals_ = {**_GLOBAL, **_GLOBAL_OVERRIDES.get(architecture, {})}
    if name in globals_:
        return globals_[name]
    match = _BLOCK.match(name)
    if not match:
        return None
    layer, part, kind = match.groups()
    if kind == "scale":  # Gemma 4's router scales sit beside their tensor: ffn_gate_inp.scale
        part, kind = f"{part}.scale", "weight"
    table = {**_LAYER, **_LAYER_OVERRIDES.get(architecture, {})}
    if part not in table:
        return None
    if part in _BARE:
        return f"model.layers.{layer}.{table[part]}"
    if kind is None:
        if (architecture, part) not in _NO_SUFFIX:
            return None
        kind = "weight"
    return f"model.layers.{layer}.{table[part]}.{kind}"
