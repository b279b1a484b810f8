"""The shell every pre-norm decoder shares: embeddings, a stack of layers, the final
norm and the output head. An architecture file supplies only its decoder layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cholla.layers.attention import AttentionMetadata
from cholla.layers.linear import DenseTensor, Embedding, Linear, Weight
from cholla.layers.mlp import GatedMLP
from cholla.layers.moe import (SparseMoE, clamped_swiglu, sigmoid_group_topk, softmax_topk, split_experts,
                               topk_softmax)
from cholla.layers.norm import RMSNorm
from cholla.models.config import ModelConfig
from cholla.models.fused_decode import fused_logits, run_layers
from cholla.models.loading import load_named_weights


def feed_forward(config: ModelConfig, layer_index: int) -> nn.Module:
    """Layer ``layer_index``'s MLP: the config's mixture of experts, or a dense gated MLP."""
    moe = config.moe
    if moe is None or layer_index in moe.dense_layers:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    bias = None
    if moe.router == "softmax_topk":
        route = softmax_topk(moe.top_k, moe.normalize)
    elif moe.router == "topk_softmax":
        route = topk_softmax(moe.top_k)
    else:
        bias = DenseTensor(moe.num_experts)
        route = sigmoid_group_topk(moe.top_k, bias, moe.num_groups, moe.groups_used, moe.normalize, moe.routed_scale)
    glu = clamped_swiglu(moe.swiglu_alpha, moe.swiglu_limit) if moe.swiglu_limit is not None else None
    biased = config.architecture == "gpt_oss"
    return SparseMoE(config.hidden_size, moe.intermediate_size, moe.num_experts, route, config.hidden_act, glu,
                     router_bias=biased, expert_bias=biased, shared_intermediate_size=moe.shared_intermediate_size,
                     correction_bias=bias, gated=moe.gated,
                     shared_expert_gate=moe.shared_expert_gate)


class PreNormLayer(nn.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``: the Llama-shaped layer. The
    architecture picks the attention and MLP; the names are HF's."""

    def __init__(self, config: ModelConfig, attention: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """``make_layer(config, index)`` builds layer ``index``; each layer is called as
    ``layer(x, positions, kv_cache, meta)`` and returns the new residual stream."""

    def __init__(self, config: ModelConfig, make_layer: Callable[[ModelConfig, int], nn.Module]):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [tokens] -> final hidden states [tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        return self.norm(run_layers(self, x, positions, kv_caches, meta))

    def decode_logits(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                      greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``compute_logits(forward(...), reuse_output=True)`` of a decode step, bit for bit, with the
        embedding, layers, final norm and head in one kernel call (``fused_decode.fused_logits``), and
        with ``greedy`` each row's argmax (as the sampler's ``argmax``; from more than ``INT8_MAX_ROWS``
        rows, the head's own jobs give it and the logits are not written: see ``fused_logits``); or
        None where that does not serve (then nothing has run). An architecture that changes the
        forward or the logits (a scaled embedding, a soft cap) gets None unless it says otherwise
        (Gemma 3's scaled embedding)."""
        cls = type(self)
        if cls.forward is not DecoderModel.forward or cls.compute_logits is not DecoderModel.compute_logits:
            return None
        return fused_logits(self, input_ids, positions, kv_caches, meta, greedy)

    def compute_logits(self, hidden: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        """reuse_output: see Linear.forward (the result lives until the next such call)."""
        return self.lm_head(hidden, reuse_output)

    def greedy_tokens(self, hidden: torch.Tensor, decode: bool = False) -> torch.Tensor | None:
        """``argmax(compute_logits(hidden))`` per row without the logits (``Linear.greedy_tokens``),
        or None where that is not served. A model whose ``compute_logits`` changes the head's
        product (a scale, a soft cap: ties may differ after rounding) gets None unless it says
        otherwise."""
        if type(self).compute_logits is not DecoderModel.compute_logits:
            return None
        return self.lm_head.greedy_tokens(hidden, decode)

    def load_weights(self, weights: dict[str, Weight]) -> set[str]:
        """HF-named weights in; returns the names no module took."""
        weights = {name.removeprefix("model."): w for name, w in weights.items()}
        if self.config.tie_word_embeddings or "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        return load_named_weights(self, self.sanitize(weights))

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        """Checkpoint names and layouts -> this model's (architectures extend it): stacked
        expert tensors (GGUF's ``ffn_*_exps``) become one entry per expert."""
        return split_experts(weights, self.config.moe.num_experts) if self.config.moe else weights
