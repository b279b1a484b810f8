"""The KV cache's disk tier: block files that survive eviction and restarts, are never trusted
blindly, and stay within their budget; and the engine reading them back gives the same tokens."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from cholla.kv.block_manager import chain_hash
from cholla.kv.disk_tier import DiskTier, cache_parts, fingerprint, model_identity
from cholla.kv.kv_types import ScaledKV
from tests.conftest import engine_on

FINGERPRINT = bytes(range(16))
BLOCK_SIZE = 4


def _fake_cache(num_blocks: int = 8) -> list[tuple]:
    """Two layers shaped like a paged cache: f32 K and V, and an int8 K with fp16 scales beside a bf16 V."""
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(num_blocks, BLOCK_SIZE, 2, 8, generator=g), torch.randn(num_blocks, BLOCK_SIZE, 2, 8, generator=g)),
        (ScaledKV(torch.randint(-127, 127, (num_blocks, BLOCK_SIZE, 2, 8), dtype=torch.int8, generator=g),
                  torch.randn(num_blocks, BLOCK_SIZE, 2, 1, generator=g).half()),
         torch.randn(num_blocks, BLOCK_SIZE, 2, 8, generator=g).bfloat16()),
    ]


def _entries(count: int) -> list[tuple[int, tuple[int, ...]]]:
    """(hash, tokens) of the first ``count`` blocks of one sequence."""
    entries, parent = [], None
    for i in range(count):
        tokens = tuple(range(10 * i, 10 * i + BLOCK_SIZE))
        parent = chain_hash(parent, tokens)
        entries.append((parent, tokens))
    return entries


def _tier(directory, cache, budget_blocks: int = 100, fp: bytes = FINGERPRINT) -> DiskTier:
    parts = cache_parts(cache)
    file_bytes = 64 + 8 * BLOCK_SIZE + sum(p.shape[1] * p.dtype.itemsize for p in parts)
    return DiskTier(directory, budget_blocks * file_bytes, fp, parts)


def _block_rows(cache, block: int) -> list[torch.Tensor]:
    return [p[block].clone() for p in cache_parts(cache)]


def test_chain_hash_is_the_same_in_another_process():
    """Python's hash(None), the first block's parent, differs between processes before 3.12: files
    written by one process must be named the same by the next."""
    code = "from cholla.kv.block_manager import chain_hash; print(chain_hash(chain_hash(None, (1, 2, 3)), (4, 5)))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert int(out) == chain_hash(chain_hash(None, (1, 2, 3)), (4, 5))
    assert chain_hash(None, (1, 2, 3)) != chain_hash(None, (1, 2, 4)) != chain_hash(0, (1, 2, 3))


def test_blocks_round_trip_through_files_and_a_restart(tmp_path):
    cache = _fake_cache()
    entries = _entries(3)
    tier = _tier(tmp_path, cache)
    expected = [_block_rows(cache, b) for b in (1, 2, 3)]
    tier.save(entries, [1, 2, 3])
    tier.flush()
    tier.close()
    assert tier.stats.writes == 3 and tier.num_files == 3

    again = _tier(tmp_path, cache)  # a restart: the index is rebuilt by scanning
    assert again.num_files == 3 and all(again.contains(h) for h, _ in entries)
    assert again.load(entries, [5, 6, 7]) == 3
    assert all(torch.equal(a, b) for block, rows in zip((5, 6, 7), expected)
               for a, b in zip(_block_rows(cache, block), rows))
    assert again.stats.hits == 3 and again.stats.invalid == 0
    # Another block's tokens under the same name (a hash collision) are a miss, not a wrong block.
    wrong = [(entries[0][0], (9, 9, 9, 9))]
    assert again.load(wrong, [4]) == 0
    again.close()


def test_a_burst_of_evictions_waits_for_the_writer_instead_of_dropping(tmp_path, monkeypatch):
    """And a long run of blocks is read ahead a window at a time and copied in a chunk at a time."""
    from cholla.kv import disk_tier

    cache = _fake_cache()
    parts = cache_parts(cache)
    block_bytes = sum(p.shape[1] * p.dtype.itemsize for p in parts)
    monkeypatch.setattr(disk_tier, "STAGING_BYTES", block_bytes)  # one block
    monkeypatch.setattr(disk_tier, "MAX_PREFETCH_BYTES", 2 * block_bytes)
    monkeypatch.setattr(disk_tier, "LOAD_CHUNK_BYTES", 3 * block_bytes)
    tier = _tier(tmp_path, cache)
    entries = _entries(4)
    tier.save(entries, [0, 1, 2, 3])
    tier.close()
    assert tier.stats.writes == 4 and tier.stats.dropped == 0
    again = _tier(tmp_path, cache)
    assert again.load(entries, [4, 5, 6, 7]) == 4
    assert all(torch.equal(p[b], p[b + 4]) for p in parts for b in range(4))
    again.close()


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[-5] ^= 0xFF
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "foreign":  # a sound file of another model (fingerprint) under this block's name
        data[12:28] = bytes(16)
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["flipped", "truncated", "foreign", "missing"])
def test_a_damaged_file_is_a_miss_and_removed(tmp_path, how):
    cache = _fake_cache()
    entries = _entries(3)
    tier = _tier(tmp_path, cache)
    tier.save(entries, [1, 2, 3])
    tier.close()
    path = tier.dir / f"{entries[1][0]:032x}.kvb"
    if how == "missing":
        path.unlink()
    else:
        _damage(path, how)
    before = _block_rows(cache, 6)

    again = _tier(tmp_path, cache)
    assert again.load(entries, [5, 6, 7]) == 1  # the chain stops at the bad block
    assert torch.equal(_block_rows(cache, 6)[0], before[0])  # nothing of it reached the cache
    assert not path.exists() and not again.contains(entries[1][0])
    assert again.stats.invalid == (0 if how == "missing" else 1)
    again.close()


def test_the_directory_keeps_its_budget_least_recently_used_out(tmp_path):
    cache = _fake_cache()
    entries = _entries(5)
    tier = _tier(tmp_path, cache, budget_blocks=3)
    for i in range(3):
        tier.save(entries[i : i + 1], [i])
        tier.flush()
        time.sleep(0.02)  # file times are as coarse as the kernel's clock tick
    assert tier.load(entries[:1], [7]) == 1  # block 0 is now the most recently used
    time.sleep(0.02)
    tier.save(entries[3:4], [3])
    tier.flush()
    assert [tier.contains(h) for h, _ in entries[:4]] == [True, False, True, True]
    assert tier.bytes_on_disk <= tier.budget and tier.stats.removed == 1
    tier.close()

    time.sleep(0.02)
    again = _tier(tmp_path, cache, budget_blocks=3)  # the order survives: files' times, rebuilt by a scan
    again.save(entries[4:5], [4])
    again.flush()
    assert [again.contains(h) for h, _ in entries[:5]] == [True, False, False, True, True]
    again.close()
    smaller = _tier(tmp_path, cache, budget_blocks=1)  # a lower budget applies at start
    assert smaller.num_files == 1 and smaller.contains(entries[4][0])
    smaller.close()


def test_the_fingerprint_names_model_layout_and_types(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(bytes(1000))
    cache = _fake_cache()
    base = fingerprint(model, cache, BLOCK_SIZE, "K f32 V f32", "float32")
    assert base == fingerprint(model, cache, BLOCK_SIZE, "K f32 V f32", "float32")
    assert base != fingerprint(model, cache, 2 * BLOCK_SIZE, "K f32 V f32", "float32")
    assert base != fingerprint(model, cache, BLOCK_SIZE, "K q8_0 V f32", "float32")
    assert base != fingerprint(model, cache, BLOCK_SIZE, "K f32 V f32", "bfloat16")
    assert base != fingerprint(model, cache[:1], BLOCK_SIZE, "K f32 V f32", "float32")
    # A calibrated type's stored values are relative to its per-channel statistics.
    k, v = cache[1]
    calibrated = [cache[0], (k._replace(shift=torch.zeros(2, 8), spread=torch.ones(2, 8)), v)]
    other = [cache[0], (k._replace(shift=torch.zeros(2, 8), spread=torch.full((2, 8), 2.0)), v)]
    assert len({base, fingerprint(model, calibrated, BLOCK_SIZE, "K f32 V f32", "float32"),
                fingerprint(model, other, BLOCK_SIZE, "K f32 V f32", "float32")}) == 3
    identity = model_identity(model)
    model.write_bytes(bytes(500) + b"\x01" + bytes(499))  # the same size, another model
    assert model_identity(model) != identity


# -- the engine ----------------------------------------------------------------------------------

PROMPTS = [  # 37 and 39 tokens: four full 8-token blocks each
    "Once upon a time, in a land far away, there lived a " + "very " * 20 + "old dragon who",
    "The history of the printing press begins in " + "the city of Mainz, " * 5 + "where",
]
GREEDY = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
ENGINE = dict(max_model_len=60, max_num_batched_tokens=64, block_size=8, dtype="float32")


def _engine(smollm2_loaded, monkeypatch, **config):
    return engine_on(smollm2_loaded, monkeypatch, **{**ENGINE, **config})


def _generate(engine, prompts) -> list[list[int]]:
    from cholla import SamplingParams

    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(**GREEDY))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks  # no block leaked
    assert all(count == 0 for count in manager.allocator.ref_counts)
    return [done[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def alone(smollm2_loaded):
    """Each prompt's greedy tokens, recomputed from scratch; and the bytes of one block."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        reference = _engine(smollm2_loaded, monkeypatch, enable_prefix_caching=False)
        return [_generate(reference, [p])[0] for p in PROMPTS], reference.kv_layout.block_bytes


def test_evicted_blocks_come_back_from_disk_and_after_a_restart(smollm2_loaded, alone, monkeypatch, tmp_path):
    tokens, block_bytes = alone
    tight = dict(kv_cache_memory=8 * block_bytes, kv_offload_dir=str(tmp_path))  # about one prompt's blocks

    engine = _engine(smollm2_loaded, monkeypatch, **tight)
    disk = engine.block_manager.disk
    assert _generate(engine, [PROMPTS[0]]) == [tokens[0]]
    assert _generate(engine, [PROMPTS[1]]) == [tokens[1]]  # evicts the first prompt's blocks to disk
    disk.flush()
    assert disk.stats.writes > 0
    assert _generate(engine, [PROMPTS[0]]) == [tokens[0]]
    assert disk.stats.hits > 0  # read back, not recomputed
    assert engine.stats().kv_offload_blocks_read == disk.stats.hits  # what /metrics reports
    engine.close()  # the blocks still only in memory go to disk too

    # A restart on the same directory finds them; one damaged file is a miss, removed, not a wrong answer.
    ids = [engine.tokenize_prompt(p)[1] for p in PROMPTS]
    first = chain_hash(None, tuple(ids[0][:8]))
    damaged = disk.dir / f"{chain_hash(first, tuple(ids[0][8:16])):032x}.kvb"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(data)
    restarted = _engine(smollm2_loaded, monkeypatch, **tight)
    stats = restarted.block_manager.disk.stats
    assert _generate(restarted, [PROMPTS[0]]) == [tokens[0]]
    assert stats.hits == 1 and stats.invalid == 1 and not damaged.exists()  # block 0, then the damaged one
    assert _generate(restarted, [PROMPTS[1]]) == [tokens[1]]
    assert stats.hits == 1 + 4  # every full block of the second prompt
    restarted.close()


def test_preemption_with_the_tier_gives_the_same_tokens_and_frees_every_block(smollm2_loaded, alone, monkeypatch, tmp_path):
    """Room for about one prompt: the two run together, one is preempted and comes back through
    the prefix cache (its blocks in memory or on disk), and every block is freed at the end."""
    tokens, block_bytes = alone
    engine = _engine(smollm2_loaded, monkeypatch, kv_cache_memory=8 * block_bytes, max_num_batched_tokens=16,
                     kv_offload_dir=str(tmp_path))
    assert _generate(engine, PROMPTS) == tokens
    assert engine.metrics.preemptions > 0
    assert engine.block_manager.disk.stats.writes > 0
    engine.close()


def test_the_tier_needs_the_prefix_cache_and_is_off_for_models_with_state(smollm2_loaded, monkeypatch, tmp_path):
    from cholla.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="prefix cache"):
        _engine(smollm2_loaded, monkeypatch, kv_offload_dir=str(tmp_path), enable_prefix_caching=False)
    loaded, tokenizer = smollm2_loaded
    config = dataclasses.replace(loaded.config, state_shapes=[((1,),)] * loaded.config.num_layers)
    hybrid = (dataclasses.replace(loaded, config=config), tokenizer)
    assert _engine(hybrid, monkeypatch, kv_offload_dir=str(tmp_path)).block_manager.disk is None


def test_cli_flags_reach_the_engine_config():
    from cholla.cli import _engine_kwargs, build_parser

    for command in (["run", "hi"], ["chat"], ["serve"]):
        args = build_parser().parse_args([*command, "--kv-offload-dir", "/tmp/kv", "--kv-offload-gib", "2.5"])
        kwargs = _engine_kwargs(args)
        assert kwargs["kv_offload_dir"] == "/tmp/kv" and kwargs["kv_offload_gib"] == 2.5
