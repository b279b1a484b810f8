"""What a model file holds, read from its header alone (no weights are loaded)."""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path
from typing import Any

import torch

from cholla.formats.gguf import read_gguf
from cholla.formats.safetensors import read_hf_folder
from cholla.kv.paged_cache import bytes_per_token
from cholla.kv.state_cache import state_bytes_per_sequence
from cholla.models.config import ATTENTION_TYPES, FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from cholla.models.config_checks import gguf_config, hf_config


def _is_routed_expert(name: str) -> bool:
    """GGUF ``ffn_*_exps`` stacks and HF ``experts.N.*`` / fused ``experts.*`` tensors (not shared experts),
    and Granite's fused ``block_sparse_moe.input_linear`` / ``output_linear`` stacks."""
    return ("_exps." in name or (".experts." in name and "shared" not in name)
            or ".block_sparse_moe.input_linear." in name or ".block_sparse_moe.output_linear." in name)


def _layer_kinds(config: ModelConfig) -> list[str]:
    """Each layer's kind; an attention layer that also keeps a state runs a Mamba-2 mixer beside it (Falcon-H1)."""
    states = config.state_shapes or [()] * config.num_layers
    return [f"{kind} + mamba" if kind in ATTENTION_TYPES and state else kind
            for kind, state in zip(config.layer_types, states)]


def _attention_kind(config: ModelConfig) -> str:
    attention_layers = sum(kind in ATTENTION_TYPES for kind in config.layer_types)
    if not attention_layers:
        return "none (recurrent layers only)"
    kind = "latent (MLA)" if config.mla else "grouped-query" if config.num_kv_heads < config.num_heads else "multi-head"
    if attention_layers < config.num_layers:  # a hybrid: the other layers are recurrent or MLP only
        kind += f" in {attention_layers} of {config.num_layers} layers"
    sliding = sum(t == SLIDING_ATTENTION for t in config.layer_types)
    if sliding:
        kind += f", sliding window {config.sliding_window} in {sliding} of {config.num_layers} layers"
    if FULL_ATTENTION in config.layer_types and (config.global_head_dim or config.global_kv_heads):
        kv_heads, head_dim = config.layer_attention(config.layer_types.index(FULL_ATTENTION))
        kind += f"; global layers: head dim {head_dim}, KV heads {kv_heads}" + (", K = V" if config.attention_k_eq_v else "")
    if config.kv_shared_layers:
        kind += f"; last {config.kv_shared_layers} layers share KV"
    return kind + (", sinks" if config.attention_sinks else "")


def model_info(path: Path) -> dict[str, Any]:
    if path.is_dir():
        folder = read_hf_folder(path)
        config = hf_config(folder)
        from safetensors import safe_open

        counts: Counter[str] = Counter()
        params = expert_params = 0
        for shard in folder.shards:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    n = prod(sl.get_shape()) * (2 if sl.get_dtype() == "U8" and name.endswith("_blocks") else 1)
                    params += n
                    expert_params += n if _is_routed_expert(name) else 0
                    counts[sl.get_dtype()] += 1
        tokenizer_kind = "tokenizer.json" if (path / "tokenizer.json").exists() else "none"
        template = (path / "tokenizer_config.json").exists() and "chat_template" in (path / "tokenizer_config.json").read_text()
        size = sum(s.stat().st_size for s in folder.shards)
        fmt = "safetensors"
    else:
        gguf = read_gguf(path)
        config = gguf_config(gguf)
        counts = Counter(t.qtype.name for t in gguf.tensors.values())
        params = sum(prod(t.shape) for t in gguf.tensors.values())
        expert_params = sum(prod(t.shape) for name, t in gguf.tensors.items() if _is_routed_expert(name))
        tokenizer_kind = str(gguf.metadata.get("tokenizer.ggml.model", "none"))
        template = bool(gguf.metadata.get("tokenizer.chat_template"))
        size = path.stat().st_size
        fmt = f"GGUF v{gguf.version}"
    return {
        "path": str(path),
        "format": fmt,
        "architecture": config.architecture,
        "parameters": params,
        "experts": None if config.moe is None else {"count": config.moe.num_experts, "active": config.moe.top_k,
                                                     "shared_size": config.moe.shared_intermediate_size},
        # routed experts count only for the share a token uses
        "active_parameters": params - (expert_params - expert_params * config.moe.top_k // config.moe.num_experts)
        if config.moe else params,
        "attention": _attention_kind(config),
        "kv_bytes_per_token": {"float32": bytes_per_token(config, torch.float32),
                               "bfloat16": bytes_per_token(config, torch.bfloat16)},
        "state_bytes_per_sequence": state_bytes_per_sequence(config),  # recurrent layers, always float32
        "layer_kinds": dict(Counter(_layer_kinds(config))),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "per_layer_input_size": config.per_layer_input_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "context_length": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "sliding_window": config.sliding_window,
        "tensor_types": dict(sorted(counts.items())),
        "tokenizer": tokenizer_kind,
        "chat_template": template,
        "file_size": size,
    }


def format_info(info: dict[str, Any]) -> str:
    def human(n: float, unit: str) -> str:
        for prefix in ("", "K", "M", "G", "T"):
            if abs(n) < 1000 or prefix == "T":
                return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
            n /= 1000
        return ""

    rows = [
        ("path", info["path"]),
        ("format", info["format"]),
        ("architecture", info["architecture"]),
        ("parameters", human(info["parameters"], "").strip()),
        ("active parameters", human(info["active_parameters"], "").strip()),
        ("experts", f"{info['experts']['active']} of {info['experts']['count']} per token"
                    + (" + shared" if info["experts"]["shared_size"] else "") if info["experts"] else "-"),
        ("attention", info["attention"]),
        ("layers", info["layers"]),
        ("hidden size", f"{info['hidden_size']}" + (f" (+ per-layer embeddings {info['per_layer_input_size']} per layer)"
                                                     if info.get("per_layer_input_size") else "")),
        ("attention heads", f"{info['heads']} (KV heads {info['kv_heads']}, head dim {info['head_dim']})"),
        ("context length", info["context_length"]),
        ("sliding window", info["sliding_window"] or "-"),
        ("layer kinds", ", ".join(f"{n} {kind}" for kind, n in info["layer_kinds"].items())),
        ("KV cache per token", f"{info['kv_bytes_per_token']['bfloat16'] / 1024:.1f} KiB (bf16), "
                               f"{info['kv_bytes_per_token']['float32'] / 1024:.1f} KiB (fp32)"),
        ("state per sequence", f"{info['state_bytes_per_sequence'] / 1024:.1f} KiB (fp32)"
                               if info["state_bytes_per_sequence"] else "-"),
        ("vocabulary", info["vocab_size"]),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in info["tensor_types"].items())),
        ("tokenizer", info["tokenizer"]),
        ("chat template", "yes" if info["chat_template"] else "no"),
        ("file size", f"{info['file_size'] / 2**20:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
