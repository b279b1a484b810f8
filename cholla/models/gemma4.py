"""Gemma 4 (text): Gemma 3's layer (``models/gemma3.py``: sandwich norms, QK-norm, scaled
embeddings, soft-capped logits, sliding and global layers) with:

- values RMS-normalised without a weight, and attention scores not scaled (q and k are normalised);
- global layers with their own head size and KV heads, a "proportional" rope that turns only the
  first quarter of the pairs, and optionally V taken from K's projection (``attention_k_eq_v``);
- KV sharing: the last ``kv_shared_layers`` layers have no K/V projections and attend to the
  cache of the last earlier layer of their kind (so they keep no cache of their own), their MLPs
  optionally twice as wide;
- per-layer embeddings (PLE): a second token embedding holding ``per_layer_input_size`` numbers
  per layer, mixed with a projection of the embedded token, gates a small residual update after
  each layer's MLP;
- a learned scalar on each layer's output;
- the MoE variant: a mixture of experts beside each layer's dense MLP, routed from the residual
  stream (its own norm and scale, then Mixtral's softmax with a per-expert scale on the weights),
  both branches normalised and summed before the post-feed-forward norm.

HF checkpoints store each layer's experts fused (``experts.gate_up_proj: [experts, 2 *
intermediate, hidden]``, gate rows first), as GGUF's ``ffn_gate_up_exps`` does; ``sanitize``
splits them into the stacks ``layers/moe.py`` slices per expert. A multimodal checkpoint's
vision and audio towers are skipped (text only).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cholla.formats.gguf import GGUFTensor
from cholla.layers.attention import Attention, AttentionMetadata, paged_attention
from cholla.layers.linear import DenseTensor, Embedding, Linear, Weight, linear_group
from cholla.layers.mlp import GatedMLP, gated_activation
from cholla.layers.moe import SparseMoE, softmax_topk_scaled
from cholla.layers.norm import RMSNorm, rms_norm
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import SLIDING_ATTENTION, ModelConfig
from cholla.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM

log = logging.getLogger(__name__)

# Keys and values of this step, per layer kind, from the last unshared layer of that kind.
SharedKV = dict[str, tuple[torch.Tensor, torch.Tensor]]

_OTHER_TOWERS = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")


class Gemma4Attention(Attention):
    """Attention with a weightless value norm. A KV-shared layer has only q and o projections and
    attends to the keys and values ``shared`` holds (already in its producer's cache); an unshared
    one puts its own there for the layers that share them."""

    def __init__(self, config: ModelConfig, index: int, rotary: RotaryEmbedding):
        kv_heads, head_dim = config.layer_attention(index)
        kind = config.layer_types[index]
        super().__init__(config.hidden_size, config.num_heads, kv_heads, head_dim, rotary, scale=config.attn_scale,
                         bias=config.attention_bias, qk_norm_eps=config.rms_norm_eps,
                         window=config.sliding_window if kind == SLIDING_ATTENTION else None)
        self.kind, self.eps, self.value_scale = kind, config.rms_norm_eps, torch.ones(head_dim)
        self.shares_kv = config.kv_producer(index) != index
        if self.shares_kv:
            self.k_proj = self.v_proj = self.k_norm = None
        elif config.attention_k_eq_v and kind != SLIDING_ATTENTION:
            self.v_proj = None  # V is K's projection, before K's norm and rope

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata, shared: SharedKV):
        """x: [tokens, hidden] -> [tokens, hidden]."""
        tokens = x.shape[0]
        if self.shares_kv:
            q = self.q_norm(self.q_proj(x).view(tokens, self.num_heads, self.head_dim))
            q = self.rotary.rotate_queries(positions, q)
            k, v = shared[self.kind]
        else:
            projections = (self.q_proj, self.k_proj) if self.v_proj is None else (self.q_proj, self.k_proj, self.v_proj)
            q, k, *v = linear_group(projections, x)
            q = self.q_norm(q.view(tokens, self.num_heads, self.head_dim))
            k = k.view(tokens, self.num_kv_heads, self.head_dim)
            v = rms_norm(v[0].view(tokens, self.num_kv_heads, self.head_dim) if v else k, self.value_scale, self.eps)
            q, k = self.rotary(positions, q, self.k_norm(k))
            shared[self.kind] = k, v
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window, None,
                              self.compute_dtype, write=not self.shares_kv)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


class Gemma4Router(nn.Module):
    """What the router reads: the residual stream RMS-normalised without a weight, times the learned
    ``scale`` and hidden^-1/2. ``per_expert_scale`` multiplies the routing weights (``softmax_topk_scaled``)."""

    def __init__(self, hidden_size: int, num_experts: int, eps: float):
        super().__init__()
        self.eps, self.root = eps, hidden_size**-0.5
        self.scale = DenseTensor(hidden_size)
        self.per_expert_scale = DenseTensor(num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale.value * self.root, self.eps)


class Gemma4DecoderLayer(Gemma3DecoderLayer):
    """Gemma 3's layer with the MoE branch beside the MLP, the per-layer input after it, and the
    output scalar."""

    def __init__(self, config: ModelConfig, index: int, rotary: RotaryEmbedding):
        hidden, eps, act = config.hidden_size, config.rms_norm_eps, config.hidden_act
        super().__init__(config, Gemma4Attention(config, index, rotary),
                         GatedMLP(hidden, config.layer_intermediate_size(index), act))
        self.layer_scalar = DenseTensor(1)
        self.per_layer_input_gate = self.per_layer_projection = self.post_per_layer_input_norm = None
        if config.per_layer_input_size:
            self.per_layer_input_gate = Linear(hidden, config.per_layer_input_size)
            self.per_layer_projection = Linear(config.per_layer_input_size, hidden)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)
        self.moe = self.router = None
        moe = config.moe
        if moe is not None and index not in moe.dense_layers:
            self.router = Gemma4Router(hidden, moe.num_experts, eps)
            self.moe = SparseMoE(hidden, moe.intermediate_size, moe.num_experts,
                                 softmax_topk_scaled(moe.top_k, self.router.per_expert_scale), act)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.activation = act

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata, per_layer_input: torch.Tensor | None,
                shared: SharedKV):
        """x: [tokens, hidden]; per_layer_input: [tokens, per_layer_input_size] or None."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, shared))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe is not None:
            routed = self.moe(self.pre_feedforward_layernorm_2(x), self.router(x))
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = x + self.post_feedforward_layernorm(h)
        if per_layer_input is not None:
            gated = gated_activation(self.per_layer_input_gate(x), per_layer_input, self.activation)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return x * self.layer_scalar.value


class Gemma4ForCausalLM(Gemma3ForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        size = config.per_layer_input_size
        if size:
            self.embed_tokens_per_layer = Embedding(config.per_layer_vocab_size or config.vocab_size,
                                                    config.num_layers * size)
            self.per_layer_model_projection = Linear(config.hidden_size, config.num_layers * size)
            self.per_layer_projection_norm = RMSNorm(size, config.rms_norm_eps)
            self.per_layer_embed_scale = torch.tensor(size**0.5, dtype=torch.float32)
        # each layer reads the cache of its KV producer (itself, unless it shares another's)
        self.kv_producers = [config.kv_producer(i) for i in range(config.num_layers)]

    def decoder_layer(self, config: ModelConfig, index: int, rotary: RotaryEmbedding) -> nn.Module:
        return Gemma4DecoderLayer(config, index, rotary)

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """PLE: the token's own per-layer embedding and a projection of its embedding ``x``,
        averaged (times 2^-1/2). -> [tokens, layers, per_layer_input_size]."""
        layers, size = self.config.num_layers, self.config.per_layer_input_size
        own = self.embed_tokens_per_layer(input_ids) * self.per_layer_embed_scale
        projected = self.per_layer_model_projection(x) * self.config.hidden_size**-0.5
        projected = self.per_layer_projection_norm(projected.view(-1, layers, size))
        return (projected + own.view(-1, layers, size)) * 2**-0.5

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        per_layer = self.per_layer_inputs(input_ids, x) if self.config.per_layer_input_size else None
        shared: SharedKV = {}
        for index, layer in enumerate(self.layers):
            layer_input = None if per_layer is None else per_layer[:, index]
            x = layer(x, positions, kv_caches[self.kv_producers[index]], meta, layer_input, shared)
        return self.norm(x)

    def load_weights(self, weights: dict[str, Weight]) -> set[str]:
        """The text tower of a multimodal checkpoint (``model.language_model.*``) or a text one;
        the other towers' tensors are skipped."""
        text, skipped = {}, 0
        for name, w in weights.items():
            name = name.replace("model.language_model.", "model.", 1)
            if name.removeprefix("model.").startswith(_OTHER_TOWERS):
                skipped += 1
            else:
                text[name] = w
        if skipped:
            log.info("Gemma 4: skipped %d vision/audio tensors (cholla runs the text model)", skipped)
        return super().load_weights(text)

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        out: dict[str, Weight] = {}
        for name, w in weights.items():
            prefix, _, last = name.rpartition(".experts.")
            if prefix and last == "gate_up_proj":  # [experts, 2 * intermediate, hidden], gate rows first
                half = w.shape[1] // 2
                out[f"{prefix}.moe.experts.gate_proj.weight"] = _rows(w, 0, half)
                out[f"{prefix}.moe.experts.up_proj.weight"] = _rows(w, half, 2 * half)
            elif prefix and last == "down_proj":
                out[f"{prefix}.moe.experts.down_proj.weight"] = w
            else:
                out[name.replace(".router.proj.", ".moe.gate.")] = w
        return super().sanitize(out)


def _rows(weight: Weight, start: int, stop: int) -> Weight:
    """Rows ``start:stop`` of each expert of a stacked ``[experts, rows, cols]`` weight (a view)."""
    if isinstance(weight, torch.Tensor):
        return weight[:, start:stop]
    experts, _, cols = weight.shape
    return GGUFTensor(weight.name, weight.qtype, (experts, stop - start, cols), weight.data[:, start:stop], weight.offset)
