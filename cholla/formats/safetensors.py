"""Read a Hugging Face model folder: config, generation config and SafeTensors weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cholla.errors import ModelFormatError, ModelNotFoundError

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class HFFolder:
    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        """All weights, in their stored dtype (bf16 stays bf16: no fp32 copy)."""
        out: dict[str, torch.Tensor] = {}
        for shard in self.shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        out[name] = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ModelFormatError(f"{shard} is corrupt or truncated ({e}); download it again") from None
        return out


    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's shape, from the shards' headers alone (no tensor is read)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in self.shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        shapes[name] = tuple(f.get_slice(name).get_shape())
            except (SafetensorError, OSError) as e:
                raise ModelFormatError(f"{shard} is corrupt or truncated ({e}); download it again") from None
        return shapes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None


def read_hf_folder(path: str | os.PathLike) -> HFFolder:
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"model folder not found: {path}")
    if not (path / "config.json").exists():
        raise ModelFormatError(f"{path} has no config.json; is it a Hugging Face model folder?")
    config = _read_json(path / "config.json")
    generation = _read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    if (path / INDEX_FILE).exists():
        index = _read_json(path / INDEX_FILE)
        names = sorted(set(index.get("weight_map", {}).values()))
        shards = [path / n for n in names]
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise ModelFormatError(f"{path}: shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelFormatError(f"{path} has no *.safetensors weights")
    return HFFolder(path, config, generation, shards)
