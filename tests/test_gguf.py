"""GGUF reading: our parser against the ``gguf`` package (its writer and its reader), and broken files."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from cholla.errors import ModelFormatError, ModelNotFoundError
from cholla.formats.gguf import read_gguf

NAMES = ["a", "bé", "", "▁▁"]


def write_small_gguf(path: Path) -> Path:
    """A small file written by the reference writer: every kind of value and two tensors."""
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("test.count", 7)
    writer.add_int64("test.big", -(2**40))
    writer.add_float32("test.eps", 1e-6)
    writer.add_bool("test.flag", True)
    writer.add_string("test.text", "héllo")
    writer.add_array("test.names", NAMES)
    writer.add_array("test.scores", [0.5, -1.25, 3.0])
    writer.add_array("test.types", [1, 3, 6])
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    weights = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    blocks = quantize(weights, GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", blocks, raw_shape=blocks.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def small_gguf(tmp_path: Path) -> Path:
    return write_small_gguf(tmp_path / "small.gguf")


def reader_view(path: Path) -> tuple[dict, list]:
    """What ``gguf.GGUFReader`` sees: metadata as Python values, and each tensor's table entry and bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = GGUFReader(path, "r")
    metadata = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            metadata[key] = value.item() if isinstance(value, np.generic) else value
    return metadata, reader.tensors


def assert_same_as_reader(path: Path) -> None:
    ours = read_gguf(path)
    metadata, tensors = reader_view(path)
    assert list(ours.metadata) == list(metadata)
    for key, value in metadata.items():
        assert type(ours.metadata[key]) is type(value), key
        assert ours.metadata[key] == value, key
        if isinstance(value, list):
            assert [type(v) for v in ours.metadata[key]] == [type(v) for v in value], key
    assert list(ours.tensors) == [t.name for t in tensors]
    for t in tensors:
        tensor = ours.tensors[t.name]
        assert tensor.qtype == t.tensor_type
        assert tensor.shape == tuple(reversed(t.shape.tolist()))
        assert tensor.offset == t.data_offset
        expected = torch.from_numpy(np.array(t.data))
        assert tensor.data.dtype == expected.dtype and tensor.data.shape == expected.shape
        assert tensor.num_bytes == t.n_bytes
        assert torch.equal(tensor.data, expected)


def test_small_file_reads_what_the_writer_wrote(small_gguf: Path):
    gguf = read_gguf(small_gguf)
    assert gguf.version == 3 and gguf.architecture == "llama"
    m = gguf.metadata
    assert (m["test.count"], m["test.big"], m["test.flag"], m["test.text"]) == (7, -(2**40), True, "héllo")
    assert m["test.eps"] == float(np.float32(1e-6))
    assert m["test.names"] == NAMES and m["test.scores"] == [0.5, -1.25, 3.0] and m["test.types"] == [1, 3, 6]
    assert torch.equal(gguf.tensors["f32"].data, torch.arange(12, dtype=torch.float32).reshape(3, 4))
    q8 = gguf.tensors["q8"]
    assert q8.qtype == GGMLQuantizationType.Q8_0 and q8.shape == (2, 64)
    assert q8.data.dtype == torch.uint8 and q8.data.shape == (2, 2 * 34)
    assert_same_as_reader(small_gguf)


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_real_files_match_gguf_reader(fixture: str, request):
    """Values, value types, tensor types, shapes, offsets and bytes: all as the reference reader has them."""
    assert_same_as_reader(request.getfixturevalue(fixture))


# -- broken files ---------------------------------------------------------------


def value_offset(data: bytes, key: str) -> int:
    """Where the value type of metadata ``key`` sits (right after the key's bytes)."""
    encoded = key.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def corrupt(path: Path, offset: int, new: bytes) -> Path:
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    path.write_bytes(bytes(data))
    return path


def test_missing_file(tmp_path: Path):
    with pytest.raises(ModelNotFoundError):
        read_gguf(tmp_path / "nope.gguf")


def test_bad_magic(tmp_path: Path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        read_gguf(path)


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        read_gguf(path)


def test_unsupported_version(small_gguf: Path):
    corrupt(small_gguf, 4, struct.pack("<I", 4))
    with pytest.raises(ModelFormatError, match="version 4 is not supported"):
        read_gguf(small_gguf)


def test_big_endian_file(small_gguf: Path):
    corrupt(small_gguf, 4, struct.pack(">I", 3))
    with pytest.raises(ModelFormatError, match="big-endian"):
        read_gguf(small_gguf)


@pytest.mark.parametrize("cut", ["header", "kv", "vocabulary", "tensor info"])
def test_truncated_in_the_middle(small_gguf: Path, cut: str):
    data = small_gguf.read_bytes()
    ends = {
        "header": 20,
        "kv": value_offset(data, "test.count") + 2,
        "vocabulary": value_offset(data, "test.names") + 16 + 8 + 1 + 8 + 1,  # inside "bé"
        "tensor info": data.index(b"q8") + 3,
    }
    small_gguf.write_bytes(data[:ends[cut]])
    with pytest.raises(ModelFormatError, match="truncated or corrupt.*download it again"):
        read_gguf(small_gguf)


def test_truncated_tensor_data(small_gguf: Path):
    end = read_gguf(small_gguf).tensors["q8"].offset + 10
    small_gguf.write_bytes(small_gguf.read_bytes()[:end])
    with pytest.raises(ModelFormatError, match="tensor q8 is truncated"):
        read_gguf(small_gguf)


def test_bad_string_length(small_gguf: Path):
    first_name = value_offset(small_gguf.read_bytes(), "test.names") + 4 + 4 + 8
    corrupt(small_gguf, first_name, struct.pack("<Q", 2**62))
    with pytest.raises(ModelFormatError, match=r"test\.names'\[0\] at byte \d+ needs 4611686018427387904 bytes"):
        read_gguf(small_gguf)


def test_bad_array_length(small_gguf: Path):
    count = value_offset(small_gguf.read_bytes(), "test.scores") + 4 + 4
    corrupt(small_gguf, count, struct.pack("<Q", 2**40))
    with pytest.raises(ModelFormatError, match=r"metadata 'test\.scores' at byte \d+ needs"):
        read_gguf(small_gguf)


def test_bad_array_type(small_gguf: Path):
    element_type = value_offset(small_gguf.read_bytes(), "test.types") + 4
    corrupt(small_gguf, element_type, struct.pack("<I", 99))
    with pytest.raises(ModelFormatError, match=r"elements of metadata 'test\.types' has unknown value type 99"):
        read_gguf(small_gguf)


def test_array_of_arrays(small_gguf: Path):
    element_type = value_offset(small_gguf.read_bytes(), "test.types") + 4
    corrupt(small_gguf, element_type, struct.pack("<I", GGUFValueType.ARRAY))
    with pytest.raises(ModelFormatError, match="array of arrays"):
        read_gguf(small_gguf)


def test_bad_value_type(small_gguf: Path):
    corrupt(small_gguf, value_offset(small_gguf.read_bytes(), "test.count"), struct.pack("<I", 13))
    with pytest.raises(ModelFormatError, match=r"metadata 'test\.count' has unknown value type 13"):
        read_gguf(small_gguf)


def test_invalid_utf8(small_gguf: Path):
    text = value_offset(small_gguf.read_bytes(), "test.text") + 4 + 8
    corrupt(small_gguf, text, b"\xff")
    with pytest.raises(ModelFormatError, match=r"metadata 'test\.text' at byte \d+ is not valid UTF-8"):
        read_gguf(small_gguf)


def q8_info(path: Path) -> int:
    """Where tensor q8's info record starts: name length, name, dims count, dims, type, offset."""
    return path.read_bytes().index(struct.pack("<Q", 2) + b"q8")


def test_unknown_tensor_type(small_gguf: Path):
    corrupt(small_gguf, q8_info(small_gguf) + 10 + 4 + 2 * 8, struct.pack("<I", 1000))
    with pytest.raises(ModelFormatError, match="tensor 'q8' has type 1000"):
        read_gguf(small_gguf)


def test_row_not_a_whole_number_of_blocks(small_gguf: Path):
    corrupt(small_gguf, q8_info(small_gguf) + 10 + 4, struct.pack("<Q", 48))
    with pytest.raises(ModelFormatError, match="tensor q8 has rows of 48 values, not a multiple of Q8_0's 32"):
        read_gguf(small_gguf)


def test_misaligned_tensor_offset(small_gguf: Path):
    offset_at = q8_info(small_gguf) + 10 + 4 + 2 * 8 + 4
    (offset,) = struct.unpack_from("<Q", small_gguf.read_bytes(), offset_at)
    corrupt(small_gguf, offset_at, struct.pack("<Q", offset + 1))
    with pytest.raises(ModelFormatError, match=f"tensor q8 starts at offset {offset + 1}, not a multiple of 32"):
        read_gguf(small_gguf)


def test_duplicate_key(small_gguf: Path):
    data = small_gguf.read_bytes()
    corrupt(small_gguf, data.index(b"test.big"), b"test.eps")
    with pytest.raises(ModelFormatError, match="'test.eps' appears twice"):
        read_gguf(small_gguf)


def test_bad_alignment(tmp_path: Path):
    path = tmp_path / "aligned.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("general.alignment", 24)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="alignment = 24 is not a power of two"):
        read_gguf(path)


def test_arrays_are_decoded_on_access_and_not_kept(small_gguf: Path):
    metadata = read_gguf(small_gguf).metadata
    assert "test.names" in metadata and "nope" not in metadata and len(metadata) == 9
    first, second = metadata["test.names"], metadata["test.names"]
    assert first == second == NAMES and first is not second  # the caller owns the list
    first.append("changed")
    assert metadata["test.names"] == NAMES
    assert dict(metadata)["test.scores"] == [0.5, -1.25, 3.0]
    assert metadata.get("test.types") == [1, 3, 6] and metadata.get("nope") is None
    assert "array of 4 STRING" in repr(metadata)


def test_invalid_utf8_in_an_array_raises_on_access(small_gguf: Path):
    second_name = value_offset(small_gguf.read_bytes(), "test.names") + 4 + 4 + 8 + 8 + 1 + 8
    corrupt(small_gguf, second_name, b"\xff")
    metadata = read_gguf(small_gguf).metadata
    with pytest.raises(ModelFormatError, match=r"metadata 'test\.names'\[1\] at byte \d+ is not valid UTF-8"):
        metadata["test.names"]
