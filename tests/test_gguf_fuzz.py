"""Corrupt copies of the real SmolLM2 GGUF: each loads or fails with ``ModelFormatError``, fast, in bounded memory.

The test walks the file's header itself (independently of ``cholla.formats.gguf``)
to know where every count, type and value lies, then writes a few hundred
seeded variants: truncations, flipped bytes, wrong value types, huge counts,
contradictory config values, broken tensor records. Each variant keeps the
original's size as a sparse file (the tensor bytes read as zeros), so only its
header is written; ``cholla info``'s load (``read_gguf`` + the checked config)
must then succeed or raise ``ModelFormatError``, never anything else; a variant
that passes it is also loaded whole (and the first few build their tokenizer).
"""

from __future__ import annotations

import random
import resource
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cholla.errors import ModelFormatError
from cholla.formats.gguf import read_gguf
from cholla.models.config_checks import gguf_config
from cholla.models.loader import load_model
from cholla.tokenizer.tokenizer import Tokenizer

NUM_VARIANTS = 240
NUM_TOKENIZER_BUILDS = 10  # of the variants that load, the first ones also build their tokenizer
SEED = 19
MAX_SECONDS = 3.0  # per variant; the intact file takes ~0.06 s
MAX_RSS_GROWTH = 1 << 30

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class Layout:
    """Where the header's fields lie: (position, struct format) for each kind of field."""

    counts: list[tuple[int, str]] = field(default_factory=list)  # u64 counts and lengths, u32 dims counts
    types: list[int] = field(default_factory=list)  # u32 value-type fields
    keys: list[str] = field(default_factory=list)
    values: dict[str, tuple[int, int]] = field(default_factory=dict)  # scalar key -> (position, value type)
    tensor_fields: list[tuple[int, str]] = field(default_factory=list)  # dims, tensor types, offsets
    tensors_start: int = 0  # where the tensor infos begin
    end: int = 0  # and end


def walk(data: bytes) -> Layout:
    layout = Layout()
    pos = 24
    layout.counts += [(8, "<Q"), (16, "<Q")]
    tensor_count, kv_count = struct.unpack_from("<QQ", data, 8)

    def string(pos: int) -> tuple[str, int]:
        layout.counts.append((pos, "<Q"))
        (length,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8:pos + 8 + length].decode(), pos + 8 + length

    for _ in range(kv_count):
        key, pos = string(pos)
        layout.keys.append(key)
        layout.types.append(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if kind == 8:
            _, pos = string(pos)
        elif kind == 9:
            layout.types.append(pos)
            (element,) = struct.unpack_from("<I", data, pos)
            layout.counts.append((pos + 4, "<Q"))
            (count,) = struct.unpack_from("<Q", data, pos + 4)
            pos += 12
            for _ in range(count):
                if element == 8:
                    (length,) = struct.unpack_from("<Q", data, pos)
                    pos += 8 + length
                else:
                    pos += _SIZES[element]
        else:
            layout.values[key] = (pos, kind)
            pos += _SIZES[kind]
    layout.tensors_start = pos
    for _ in range(tensor_count):
        _, pos = string(pos)
        layout.counts.append((pos, "<I"))
        (num_dims,) = struct.unpack_from("<I", data, pos)
        layout.tensor_fields += [(pos + 4 + 8 * i, "<Q") for i in range(num_dims)]
        pos += 4 + 8 * num_dims
        layout.tensor_fields += [(pos, "<I"), (pos + 4, "<Q")]
        pos += 12
    layout.end = pos
    return layout


HUGE = (0, 1, 2**31, 2**32 - 1, 2**32 + 1, 2**62, 2**63, 2**64 - 1)
CONTRADICTIONS = {
    "llama.attention.head_count": (0, 5, 7, 64, 2**31),
    "llama.attention.head_count_kv": (0, 2, 5, 9, 2**31),
    "llama.block_count": (0, 1, 29, 31, 1_000_000, 2**32 - 1),
    "llama.embedding_length": (0, 1, 575, 577, 2**31),
    "llama.feed_forward_length": (0, 1, 1535, 2**31),
    "llama.context_length": (0, 1, 2**31, 2**32 - 1),
    "llama.vocab_size": (0, 1, 49151, 49153, 2**31),
    "llama.rope.freq_base": (float("nan"), float("inf"), -1.0, 0.0, 1e-30),
    "llama.attention.layer_norm_rms_epsilon": (float("nan"), float("inf"), -1e-5, 0.0, 2.0),
    "llama.rope.dimension_count": (0, 1, 63, 2**31),
    "tokenizer.ggml.eos_token_id": (2**31, 2**32 - 1, 49152),
    "tokenizer.ggml.bos_token_id": (2**31, 2**32 - 1, 49152),
    "general.alignment": (0, 3, 31, 64, 2**31),
}


def mutate(original: bytes, layout: Layout, rng: random.Random) -> tuple[str, bytearray | None, int | None]:
    """(what was done, the new header bytes, the file size if truncated)."""
    header = bytearray(original[:layout.end])
    kind = rng.choice(["truncate", "byte", "type", "count", "value", "value", "tensor", "bytes"])
    if kind == "truncate":
        size = rng.choice([rng.randrange(0, layout.end), rng.randrange(layout.end, layout.end + 2_000_000)])
        return f"truncate at {size}", None, size
    if kind in ("byte", "bytes"):  # the config keys (first 2 KiB), the tensor records, or anywhere in the header
        region = rng.choice([(0, 2048), (layout.tensors_start, layout.end), (0, layout.end)])
        pos = rng.randrange(*region)
        length = 1 if kind == "byte" else rng.choice([2, 4, 8, 16])
        header[pos:pos + length] = bytes(rng.randrange(256) for _ in range(length))
        return f"{length} random bytes at {pos}", header, None
    if kind == "type":
        pos = rng.choice(layout.types)
        value = rng.choice([*range(14), 2**31, 2**32 - 1])
        struct.pack_into("<I", header, pos, value)
        return f"value type at {pos} = {value}", header, None
    if kind == "count":
        pos, fmt = rng.choice(layout.counts)
        value = rng.choice(HUGE) % (2**32 if fmt == "<I" else 2**64)
        struct.pack_into(fmt, header, pos, value)
        return f"count at {pos} = {value}", header, None
    if kind == "value":
        key = rng.choice(sorted(set(CONTRADICTIONS) & set(layout.values)))
        pos, value_type = layout.values[key]
        value = rng.choice(CONTRADICTIONS[key])
        fmt = _FORMATS[value_type]
        if fmt in ("<f", "<d") or isinstance(value, float):
            fmt = "<f" if _SIZES[value_type] == 4 else "<d"
            struct.pack_into(fmt, header, pos, float(value))
        else:
            struct.pack_into(fmt, header, pos, value % (1 << (8 * _SIZES[value_type])))
        return f"{key} = {value}", header, None
    pos, fmt = rng.choice(layout.tensor_fields)
    value = rng.choice([*HUGE, rng.randrange(64), rng.randrange(1 << 20)]) % (2**32 if fmt == "<I" else 2**64)
    struct.pack_into(fmt, header, pos, value)
    return f"tensor field at {pos} = {value}", header, None


def write_variant(path: Path, original: bytes, header: bytearray | None, size: int | None, full_size: int) -> None:
    with open(path, "wb") as f:
        if header is None:
            f.write(original[:size])
        else:
            f.write(header)
            f.truncate(full_size)  # sparse: the tensor bytes read as zeros


def load_info_level(path: Path, tokenizer: bool = False) -> None:
    gguf = read_gguf(path)
    gguf_config(gguf)
    if tokenizer:  # what `cholla run` builds next (0.8 s, so only for some variants)
        Tokenizer.from_gguf(gguf.metadata)


def load_whole(path: Path) -> None:
    """The model itself, on the memory map (a tenth of a second: nothing is dequantized up front)."""
    load_model(path, "float32")


@pytest.fixture(scope="module")
def original(smollm2_path) -> tuple[bytes, Layout, int]:
    data = smollm2_path.read_bytes()[:4_000_000]
    layout = walk(data)
    return data, layout, smollm2_path.stat().st_size


def test_the_walk_matches_the_reader(smollm2_path, original):
    data, layout, _ = original
    gguf = read_gguf(smollm2_path)
    assert layout.keys == list(gguf.metadata)
    assert layout.end == min(t.offset for t in gguf.tensors.values())  # the data section starts there (aligned)
    pos, _ = layout.values["llama.block_count"]
    assert struct.unpack_from("<I", data, pos)[0] == gguf.metadata["llama.block_count"]


def test_corrupt_variants_load_or_fail_with_model_format_error(tmp_path, original):
    data, layout, full_size = original
    rng = random.Random(SEED)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    surprises, slow, outcomes = [], [], {"ok": 0, "ModelFormatError": 0}
    path = tmp_path / "variant.gguf"
    for index in range(NUM_VARIANTS):
        what, header, size = mutate(data, layout, rng)
        write_variant(path, data, header, size, full_size)
        start = time.perf_counter()
        try:
            load_info_level(path)
            outcomes["ok"] += 1
            load_whole(path)
            if outcomes["ok"] <= NUM_TOKENIZER_BUILDS:
                load_info_level(path, tokenizer=True)
        except ModelFormatError:
            outcomes["ModelFormatError"] += 1
        except Exception as e:  # noqa: BLE001 - what the test is looking for
            surprises.append(f"#{index} {what}: {type(e).__name__}: {e}")
        elapsed = time.perf_counter() - start
        if elapsed > MAX_SECONDS * (2 if outcomes["ok"] <= NUM_TOKENIZER_BUILDS else 1):
            slow.append(f"#{index} {what}: {elapsed:.1f} s")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    assert not surprises, "\n".join(surprises)
    assert not slow, "\n".join(slow)
    assert growth < MAX_RSS_GROWTH, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    # Most variants must be refused, and some (harmless changes) still load.
    assert outcomes["ModelFormatError"] > NUM_VARIANTS // 3 and outcomes["ok"] > 0, outcomes


@pytest.mark.parametrize("key, value, needle", [
    ("llama.attention.head_count", 0, "llama.attention.head_count"),
    ("llama.attention.head_count", 7, "llama.attention.head_count_kv"),
    ("llama.block_count", 1_000_000, "llama.block_count"),
    ("llama.embedding_length", 577, "llama.embedding_length"),
    ("llama.vocab_size", 49153, "llama.vocab_size"),
    ("llama.rope.freq_base", float("nan"), "llama.rope.freq_base"),
])
def test_each_contradiction_names_its_key(tmp_path, original, key, value, needle):
    data, layout, full_size = original
    header = bytearray(data[:layout.end])
    pos, value_type = layout.values[key]
    struct.pack_into(_FORMATS[value_type], header, pos, value)
    path = tmp_path / "bad.gguf"
    write_variant(path, data, header, None, full_size)
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=needle.replace(".", r"\.")):
        load_info_level(path)
    assert time.perf_counter() - start < 1.0


def test_cli_prints_one_line_and_exits_2(tmp_path, original):
    """`cholla info`, `run` and `serve` on a contradictory file: one line, status 2, no traceback."""
    data, layout, full_size = original
    header = bytearray(data[:layout.end])
    struct.pack_into("<I", header, layout.values["llama.attention.head_count"][0], 0)
    path = tmp_path / "zero-heads.gguf"
    write_variant(path, data, header, None, full_size)
    for command in (["info", str(path)], ["run", str(path), "Hi", "-n", "1"], ["serve", str(path), "--port", "0"]):
        result = subprocess.run([sys.executable, "-m", "cholla", *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        if command[0] == "serve":  # it listens first (uvicorn's lines), then the load fails
            assert "Traceback" not in result.stderr
            lines = lines[-1:]
        assert len(lines) == 1 and lines[0].startswith("cholla: error: ") and "head_count" in lines[0], result.stderr
