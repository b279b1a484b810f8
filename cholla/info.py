"""What a model file holds, read from its header alone (no weights are loaded)."""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path
from typing import Any

from cholla.formats.gguf import read_gguf
from cholla.formats.safetensors import read_hf_folder
from cholla.models.config_checks import gguf_config, hf_config


def model_info(path: Path) -> dict[str, Any]:
    if path.is_dir():
        folder = read_hf_folder(path)
        config = hf_config(folder)
        from safetensors import safe_open

        counts: Counter[str] = Counter()
        params = 0
        for shard in folder.shards:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    params += prod(sl.get_shape())
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
        tokenizer_kind = str(gguf.metadata.get("tokenizer.ggml.model", "none"))
        template = bool(gguf.metadata.get("tokenizer.chat_template"))
        size = path.stat().st_size
        fmt = f"GGUF v{gguf.version}"
    return {
        "path": str(path),
        "format": fmt,
        "architecture": config.architecture,
        "parameters": params,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
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
        ("layers", info["layers"]),
        ("hidden size", info["hidden_size"]),
        ("attention heads", f"{info['heads']} (KV heads {info['kv_heads']}, head dim {info['head_dim']})"),
        ("context length", info["context_length"]),
        ("sliding window", info["sliding_window"] or "-"),
        ("vocabulary", info["vocab_size"]),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in info["tensor_types"].items())),
        ("tokenizer", info["tokenizer"]),
        ("chat template", "yes" if info["chat_template"] else "no"),
        ("file size", f"{info['file_size'] / 2**20:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
