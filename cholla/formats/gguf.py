"""Read a GGUF file: metadata and memory-mapped tensors, nothing else.

The format (ggml's ``docs/gguf.md``) is small: magic, version, tensor count, key/value
count, the typed key/value pairs, one info record per tensor (name, dims, type, offset),
then the tensor bytes, aligned to ``general.alignment``. We parse it with ``struct`` over
a memory map. ``gguf.GGUFReader`` does the same job but keeps several numpy views per
array element: for a 262,144-token vocabulary (Gemma 3) that is a ~950 MB peak and
~240 MB held for three arrays that are ~20 MB as Python values. The ``gguf`` package
still names the value and tensor types and gives each type's block size.

Array values stay in the file until asked for (``GGUFMetadata``): the vocabulary is
needed once, to build the tokenizer, and would otherwise be held as long as the model.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from cholla.errors import ModelFormatError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS

# Scalar value types: struct format (numpy reads the same codes for arrays).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_SCALARS = {kind: struct.Struct(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
_U32, _U64 = _SCALARS[GGUFValueType.UINT32], _SCALARS[GGUFValueType.UINT64]

# Tensor types viewed with their own element type; every other type is raw blocks (uint8).
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class GGUFTensor:
    """One tensor as stored: raw bytes plus what is needed to decode them.

    ``shape`` is in PyTorch order (rows first), the reverse of GGUF's ``ne``.
    ``data`` is a uint8 view ``[rows, bytes_per_row]`` over the memory map for
    quantized types, so a row's blocks are contiguous and no byte is copied.
    ``offset`` is where those bytes start in the file.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: torch.Tensor
    offset: int = 0

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass(frozen=True)
class _Array:
    """An array value left in the file: where its first element starts, the element type, the length."""

    start: int
    element: GGUFValueType
    count: int


class GGUFMetadata(Mapping[str, Any]):
    """The key/value section, read-only. Scalars and strings are held as Python values;
    an array is decoded from the memory map on each access into a fresh ``list`` that
    the caller owns and nobody else keeps. Gemma 3's vocabulary as Python objects is
    ~45 MB that only the tokenizer's build needs; a caller that needs an array twice
    keeps the list.
    """

    def __init__(self, reader: _Reader, values: dict[str, Any]):
        self._reader, self._values = reader, values

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        return self._reader.array(value, key) if isinstance(value, _Array) else value

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def array_length(self, key: str) -> int | None:
        """How many elements the array ``key`` holds, without decoding it; None if it is absent or not an array."""
        value = self._values.get(key)
        return value.count if isinstance(value, _Array) else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shown = {k: f"<array of {v.count} {v.element.name}>" if isinstance(v, _Array) else v for k, v in self._values.items()}
        return f"GGUFMetadata({shown})"


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: GGUFMetadata
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open ``path`` as GGUF (v2 or v3); tensors stay on disk until touched.

    Metadata values become plain Python values: ``int``, ``float``, ``bool``, ``str``,
    and ``list`` for arrays (a vocabulary is a ``list[str]``), decoded when asked for.
    """
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
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the file handle
    reader = _Reader(buffer, path, pos=4)
    version = reader.scalar(_U32, "the version")
    if version not in (2, 3):
        if version and version & 0xFFFF == 0:
            raise ModelFormatError(f"{path} is a big-endian GGUF file; cholla reads little-endian files only")
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
    tensor_count = reader.scalar(_U64, "the tensor count")
    kv_count = reader.scalar(_U64, "the metadata count")

    values: dict[str, Any] = {}
    for _ in range(kv_count):
        key = reader.string("a metadata key")
        if key in values:
            raise ModelFormatError(f"{path}: metadata key {key!r} appears twice; the file is corrupt")
        values[key] = reader.value(key)

    infos = [reader.tensor_info() for _ in range(tensor_count)]
    alignment = values.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: general.alignment = {alignment!r} is not a power of two; the file is corrupt")
    data_start = -(-reader.pos // alignment) * alignment

    whole = np.frombuffer(buffer, dtype=np.uint8)
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, qtype, relative in infos:
        if name in tensors:
            raise ModelFormatError(f"{path}: tensor {name!r} appears twice; the file is corrupt")
        tensors[name] = _tensor(path, whole, name, dims, qtype, relative, data_start, alignment)
    return GGUFFile(path, version, GGUFMetadata(reader, values), tensors)


def _tensor(path: Path, whole: np.ndarray, name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType,
            relative: int, data_start: int, alignment: int) -> GGUFTensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if relative % alignment:
        raise ModelFormatError(f"{path}: tensor {name} starts at offset {relative}, not a multiple of {alignment}; the file is corrupt")
    row = dims[0] if dims else 1
    if row % block_size:
        raise ModelFormatError(
            f"{path}: tensor {name} has rows of {row} values, not a multiple of {qtype.name}'s {block_size}; the file is corrupt"
        )
    num_bytes = math.prod(dims) // block_size * type_size
    start = data_start + relative
    if start + num_bytes > len(whole):
        raise ModelFormatError(f"{path}: tensor {name} is truncated; download the file again")
    shape = tuple(reversed(dims))
    dtype = _ELEMENT_DTYPES.get(qtype)
    raw = whole[start:start + num_bytes]
    if dtype is None and shape:
        raw = raw.reshape(*shape[:-1], shape[-1] // block_size * type_size)
    elif dtype is not None:
        raw = raw.view(dtype).reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory map: we never write to it
        data = torch.from_numpy(raw)
    return GGUFTensor(name, qtype, shape, data, start)


class _Reader:
    """Little-endian values at ``pos`` in the mapped file, each checked against the file's end."""

    def __init__(self, buffer: mmap.mmap, path: Path, pos: int = 0):
        self.buffer, self.path, self.pos, self.size = buffer, path, pos, len(buffer)

    def take(self, num_bytes: int, what: str) -> int:
        """Advance past ``num_bytes``; return where they start."""
        start = self.pos
        if start + num_bytes > self.size:
            raise ModelFormatError(
                f"{self.path} is truncated or corrupt: {what} at byte {start} needs {num_bytes} bytes "
                f"but the file ends at byte {self.size}; download it again"
            )
        self.pos = start + num_bytes
        return start

    def scalar(self, layout: struct.Struct, what: str) -> Any:
        return layout.unpack_from(self.buffer, self.take(layout.size, what))[0]

    def string(self, what: str) -> str:
        length = self.scalar(_U64, f"the length of {what}")
        start = self.take(length, what)
        return self._decode(start, length, what)

    def _decode(self, start: int, length: int, what: str) -> str:
        try:
            return str(self.buffer[start:start + length], "utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{self.path}: {what} at byte {start} is not valid UTF-8; the file is corrupt") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar(_U32, f"the type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ModelFormatError(f"{self.path}: {what} has unknown value type {raw}; the file is corrupt") from None

    def value(self, key: str) -> Any:
        """The value of ``key``; an array is checked against the file's end and left there (``_Array``)."""
        what = f"metadata {key!r}"
        kind = self.value_type(what)
        if kind == GGUFValueType.STRING:
            return self.string(what)
        if kind != GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[kind], what)
        element = self.value_type(f"the elements of {what}")
        count = self.scalar(_U64, f"the length of {what}")
        start = self.pos
        if element == GGUFValueType.STRING:
            self.strings(count, what, decode=False)
        elif element == GGUFValueType.ARRAY:
            raise ModelFormatError(f"{self.path}: {what} is an array of arrays, which GGUF readers do not support")
        else:
            self.take(count * _SCALARS[element].size, what)
        return _Array(start, element, count)

    def array(self, array: _Array, key: str) -> list:
        """Decode an array ``value`` left in the file (its bounds were checked then)."""
        if array.element == GGUFValueType.STRING:
            return _Reader(self.buffer, self.path, array.start).strings(array.count, f"metadata {key!r}")
        layout = _SCALARS[array.element]
        return np.frombuffer(self.buffer, np.dtype(layout.format), array.count, array.start).tolist()

    def strings(self, count: int, what: str, decode: bool = True) -> list[str]:
        """``count`` strings straight into a list (or only skipped): the vocabulary's hot loop, so ``take`` is inlined."""
        self.take(count * _U64.size, what)  # each string has at least its length: fail early on a bad count
        self.pos -= count * _U64.size
        buffer, pos, size, unpack = self.buffer, self.pos, self.size, _U64.unpack_from
        values = []
        for index in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.take(8, f"the length of {what}[{index}]")
            (length,) = unpack(buffer, pos)
            pos += 8
            end = pos + length
            if end > size:
                self.pos = pos
                self.take(length, f"{what}[{index}]")
            if decode:
                try:
                    values.append(str(buffer[pos:end], "utf-8"))
                except UnicodeDecodeError:
                    self._decode(pos, length, f"{what}[{index}]")
            pos = end
        self.pos = pos
        return values

    def tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        """(name, dims in GGUF order, type, offset from the start of the data section)."""
        name = self.string("a tensor name")
        what = f"the info of tensor {name!r}"
        num_dims = self.scalar(_U32, what)
        if num_dims > MAX_DIMS:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has {num_dims} dimensions (at most {MAX_DIMS}); the file is corrupt")
        start = self.take(num_dims * 8, what)
        dims = struct.unpack_from(f"<{num_dims}Q", self.buffer, start)
        raw_type = self.scalar(_U32, what)
        offset = self.scalar(_U64, what)
        try:
            qtype = GGMLQuantizationType(raw_type)
            GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFormatError(
                f"{self.path}: tensor {name!r} has type {raw_type}, unknown to the installed gguf package; "
                "the file is corrupt or newer than it (upgrade gguf)"
            ) from None
        return name, dims, qtype, offset
