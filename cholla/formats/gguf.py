"""Read a GGUF file: metadata and memory-mapped tensors, nothing else.

Parsing is the ``gguf`` package's job (the format's reference reader). This
module turns its output into plain Python values and zero-copy torch views of
the tensor bytes, and turns its failures into ``ModelFormatError``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from cholla.errors import ModelFormatError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFTensor:
    """One tensor as stored: raw bytes plus what is needed to decode them.

    ``shape`` is in PyTorch order (rows first), the reverse of GGUF's ``ne``.
    ``data`` is a uint8 view ``[rows, bytes_per_row]`` over the memory map for
    quantized types, so a row's blocks are contiguous and no byte is copied.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: torch.Tensor

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def _field_value(field) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open ``path`` as GGUF (v2 or v3); tensors stay on disk until touched."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"model file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}); "
            "pass a .gguf file or a Hugging Face model folder"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise ModelFormatError(
            f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e}); download it again"
        ) from None
    version = int(_field_value(reader.fields["GGUF.version"]))
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = _field_value(field)
        except Exception as e:
            raise ModelFormatError(f"{path}: metadata key {key!r} is unreadable ({e})") from None

    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        raw = t.data
        if raw.nbytes != t.n_bytes:
            raise ModelFormatError(f"{path}: tensor {t.name} is truncated; download the file again")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memmap: we never write to it
            data = torch.from_numpy(raw)
        tensors[t.name] = GGUFTensor(t.name, GGMLQuantizationType(int(t.tensor_type)), shape, data)
    return GGUFFile(path, version, metadata, tensors)
