"""GPT-OSS: attention with a learned per-head sink logit, sliding and full layers
alternating, YaRN rope, biases on every projection, and a top-k-then-softmax
mixture of experts whose activation is a clamped SwiGLU.

HF checkpoints store the experts fused and transposed (``gate_up_proj: [experts,
hidden, 2 * intermediate]`` with gate and up interleaved, ``down_proj: [experts,
intermediate, hidden]``), in float or in the ``mxfp4`` blocks-and-scales layout;
``sanitize`` turns either into the stacked ``[experts, out, in]`` tensors GGUF
files hold, MXFP4 staying MXFP4.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from cholla.formats.gguf import GGUFTensor
from cholla.layers.attention import Attention
from cholla.layers.linear import Weight
from cholla.layers.rotary import RotaryEmbedding
from cholla.models.config import SLIDING_ATTENTION, ModelConfig
from cholla.models.decoder import DecoderModel, PreNormLayer, feed_forward
from cholla.quant.mxfp4 import ggml_blocks_from_hf


def _mxfp4(name: str, blocks: torch.Tensor, scales: torch.Tensor) -> GGUFTensor:
    """[experts, rows, groups, 16] blocks + [experts, rows, groups] scales -> one MXFP4 GGUF tensor."""
    experts, rows, groups, _ = blocks.shape
    data = ggml_blocks_from_hf(blocks, scales)
    return GGUFTensor(name, GGMLQuantizationType.MXFP4, (experts, rows, groups * 32), data)


class GptOssForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.rope_interleaved)

        def layer(cfg: ModelConfig, index: int) -> PreNormLayer:
            window = cfg.sliding_window if cfg.layer_types[index] == SLIDING_ATTENTION else None
            attention = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary,
                                  scale=cfg.attn_scale, bias=True, window=window, sinks=True, output_bias=True)
            return PreNormLayer(cfg, attention, feed_forward(cfg, index))

        super().__init__(config, layer)

    def sanitize(self, weights: dict[str, Weight]) -> dict[str, Weight]:
        out: dict[str, Weight] = {}
        for name, w in weights.items():
            prefix, _, last = name.rpartition(".experts.")
            if not prefix:
                out[name.replace(".mlp.router.", ".mlp.gate.")] = w
                continue
            experts = f"{prefix}.experts"
            if last == "gate_up_proj":  # [experts, hidden, 2 * intermediate], gate and up interleaved
                fused = w.transpose(1, 2)
                out[f"{experts}.gate_proj.weight"] = fused[:, ::2].contiguous()
                out[f"{experts}.up_proj.weight"] = fused[:, 1::2].contiguous()
            elif last == "gate_up_proj_bias":
                out[f"{experts}.gate_proj.bias"], out[f"{experts}.up_proj.bias"] = w[:, ::2], w[:, 1::2]
            elif last == "down_proj":
                out[f"{experts}.down_proj.weight"] = w.transpose(1, 2).contiguous()
            elif last == "down_proj_bias":
                out[f"{experts}.down_proj.bias"] = w
            elif last == "gate_up_proj_blocks":
                scales = weights[f"{experts}.gate_up_proj_scales"]
                out[f"{experts}.gate_proj.weight"] = _mxfp4(name, w[:, ::2], scales[:, ::2])
                out[f"{experts}.up_proj.weight"] = _mxfp4(name, w[:, 1::2], scales[:, 1::2])
            elif last == "down_proj_blocks":
                out[f"{experts}.down_proj.weight"] = _mxfp4(name, w, weights[f"{experts}.down_proj_scales"])
            elif not last.endswith("_scales"):
                out[name] = w
        return super().sanitize(out)
