"""The KV cache's disk tier: full prefix-cache blocks kept in files, past eviction and restarts.

When the prefix cache's LRU gives a full block's memory to a new allocation, the
block's bytes (every layer's K and V, scales included) are copied out at once and
a writer thread puts them in a file named by the block's chained hash
(``block_manager.chain_hash``: stable across processes). A later request whose
prefix hashes match, after the in-memory cache misses, reads the blocks back into
fresh blocks instead of recomputing them; a restarted engine finds them again.

Files live under ``DIR/<fingerprint>/<hash>.kvb``. The fingerprint names what the
bytes mean: the model file's identity (its size and a sample of its contents), the
compute dtype, the KV types and per-block layout, the block size, this format's
version and cholla's. Each file repeats the fingerprint and hash in a header
with the block's tokens and a CRC-32 of tokens and payload::

    magic "CHOLLAKV" | version u32 | fingerprint 16 B | hash 16 B | tokens u32 | payload bytes u64 | crc32 u32
    | zeros to 64 B | tokens int64[tokens] | payload (the block's bytes, part by part as ``cache_parts`` lists them)

A missing, truncated, corrupt or foreign file is a miss: it is removed, never read
into the cache. The directory (every fingerprint in it) stays within its byte
budget, least recently used files out; recency is the file's modification time,
set when a file is written or read, so a restart rebuilds the order by scanning.
One engine per directory: two would each keep the budget only for what they know.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from cholla.errors import InvalidRequestError
from cholla.kv.kv_types import ScaledKV

log = logging.getLogger("cholla")

MAGIC = b"CHOLLAKV"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sI16s16sIQI4x")  # magic, version, fingerprint, hash, tokens, payload bytes, crc32
HEADER_BYTES = 64  # the header padded, so tokens and payload lie 8-byte aligned in a read buffer
SUFFIX = ".kvb"
DEFAULT_OFFLOAD_GIB = 8.0
# Evicted blocks copied out but not yet written: a staging buffer of this size, allocated once (fresh
# buffers per eviction cost more in page faults than the copy). An eviction finding it full waits for
# the writer, as a bounded queue does: writing a block costs a small fraction of computing the tokens
# that displace it (docs/benchmarks.md), so a long prompt's burst of evictions is slowed, not lost.
# Past SAVE_WAIT_S (a disk that has stopped answering) the rest are dropped, counted.
STAGING_BYTES = 64 * 2**20
SAVE_WAIT_S = 5.0
# Blocks read ahead for queued requests and not yet taken; the oldest are forgotten past this.
MAX_PREFETCH_BYTES = 256 * 2**20
LOAD_CHUNK_BYTES = 32 * 2**20  # blocks read back go into the cache this many bytes at a time
READ_THREADS = 2
STALE_TEMP_S = 60.0  # a temporary file older than this is a write that died with its process


@dataclass
class DiskTierStats:
    hits: int = 0  # blocks read back into the cache
    writes: int = 0  # files written
    dropped: int = 0  # evicted blocks not written: the writer was stuck for SAVE_WAIT_S
    invalid: int = 0  # files found missing, truncated, corrupt or foreign, and removed
    removed: int = 0  # files removed to keep the budget


def _sample_digest(path: Path, digest) -> None:
    """Feed a file's size and a spread of its bytes (head, 32 samples, tail) into ``digest``:
    enough to tell model files apart without reading gigabytes at every start."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(4 * 2**20))
        for i in range(32):
            f.seek(size * i // 32)
            digest.update(f.read(64 * 2**10))
        f.seek(max(0, size - 2**20))
        digest.update(f.read())


def model_identity(path: Path) -> bytes:
    """A digest of a GGUF file, or of an HF folder's config and weight files."""
    digest = hashlib.blake2b(digest_size=16)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.name == "config.json" or p.suffix == ".safetensors")
    for file in files:
        _sample_digest(file, digest)
    return digest.digest()


def cache_parts(layers: list[tuple]) -> list[torch.Tensor]:
    """Every tensor of a paged KV cache (``PagedKVCache.layers``) as words ``[num_blocks, words per block]``
    (int64 where every part's block is a multiple of 8 bytes, else narrower): a block's disk payload is
    its row of each, in this order. Copies of wide words run several times faster than of bytes."""
    tensors = [t.view(torch.uint8).view(t.shape[0], -1) for layer in layers for side in layer
               for t in ((side.values, side.scales) if isinstance(side, ScaledKV) else (side,))]
    word = next(w for w in (torch.int64, torch.int32, torch.int16, torch.uint8)
                if all(t.shape[1] % w.itemsize == 0 for t in tensors))
    return [t.view(word) for t in tensors]


def fingerprint(model_path: Path, layers: list[tuple], block_size: int, kv_types: str, compute_dtype: str) -> bytes:
    """What a block file's bytes mean; a file with another fingerprint is never read. ``layers`` is
    the cache (``PagedKVCache.layers``): its per-block layout, and the calibrated types' per-channel
    statistics, which the stored values are relative to."""
    from cholla import __version__

    layout = ";".join(str(p.shape[1] * p.dtype.itemsize) for p in cache_parts(layers))
    digest = hashlib.blake2b(model_identity(model_path), digest_size=16)
    digest.update(f"v{FORMAT_VERSION}|cholla {__version__}|{compute_dtype}|{kv_types}|block {block_size}|{layout}".encode())
    for side in (side for layer in layers for side in layer if isinstance(side, ScaledKV)):
        digest.update(b"rotated" if side.rotated else b"plain")  # int8 of a power-of-two head_dim or not
        for statistic in (side.shift, side.spread):
            if statistic is not None:
                digest.update(statistic.float().contiguous().numpy().tobytes())
    return digest.digest()


class DiskTier:
    """Block files for one model and cache layout. The engine thread calls ``contains``,
    ``save``, ``prefetch`` and ``load``; a writer thread and ``READ_THREADS`` readers do the IO."""

    def __init__(self, directory: str | os.PathLike, budget_bytes: int, fingerprint: bytes, parts: list[torch.Tensor]):
        self.root = Path(directory).expanduser()
        self.budget = budget_bytes
        self.fingerprint = fingerprint
        self.parts = parts
        self.word = parts[0].dtype
        self.block_words = sum(p.shape[1] for p in parts)
        self.block_bytes = self.block_words * self.word.itemsize
        self.file_bytes = HEADER_BYTES + self.block_bytes  # plus 8 bytes per token
        if budget_bytes < self.file_bytes:
            raise InvalidRequestError(f"a KV offload budget of {budget_bytes} bytes holds no block "
                                      f"({self.file_bytes} bytes each); raise --kv-offload-gib")
        self.dir = self.root / fingerprint.hex()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidRequestError(f"cannot use {self.root} for the KV offload: {e.strerror}; "
                                      "give a writable --kv-offload-dir") from None
        self.stats = DiskTierStats()
        self._lock = threading.Lock()
        self._pending_room = threading.Condition(self._lock)
        self._files: OrderedDict[str, int] = OrderedDict()  # path -> bytes, least recently used first
        self._bytes_on_disk = 0
        self._pending: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}  # hash -> (tokens, payload) to write
        slots = max(1, STAGING_BYTES // self.block_bytes)
        self._staging = torch.empty(slots, self.block_words, dtype=self.word)  # evicted blocks' bytes, a row each
        self._free_slots = list(range(slots))
        self._load_buffer = torch.empty(max(1, LOAD_CHUNK_BYTES // self.block_bytes), self.block_words, dtype=self.word)
        self._prefetched: OrderedDict[int, Future] = OrderedDict()  # hash -> read in flight or done
        self._scan()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="cholla-kv-writer", daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cholla-kv-reader")
        self.closed = False

    # -- what is on disk -------------------------------------------------------

    def _path(self, block_hash: int) -> str:
        return str(self.dir / f"{block_hash:032x}{SUFFIX}")

    def _scan(self) -> None:
        """Index every block file under the root, oldest first, and keep the budget."""
        found = []
        now = time.time()
        for sub in self.root.iterdir():
            if not (sub.is_dir() and len(sub.name) == 32 and all(c in "0123456789abcdef" for c in sub.name)):
                continue  # only fingerprint folders are ours
            for entry in os.scandir(sub):
                try:
                    stat = entry.stat()
                    if entry.name.endswith(SUFFIX):
                        found.append((stat.st_mtime_ns, entry.path, stat.st_size))
                    elif SUFFIX + "." in entry.name and entry.name.endswith(".tmp") and now - stat.st_mtime > STALE_TEMP_S:
                        os.unlink(entry.path)
                except OSError:
                    continue
        for _, path, size in sorted(found):
            self._files[path] = size
            self._bytes_on_disk += size
        with self._lock:
            self._keep_budget()

    def _keep_budget(self) -> None:
        while self._bytes_on_disk > self.budget and self._files:
            path, size = self._files.popitem(last=False)
            self._bytes_on_disk -= size
            self.stats.removed += 1
            _unlink(path)

    def _forget(self, path: str) -> None:
        """A file found bad: out of the index and off the disk."""
        with self._lock:
            size = self._files.pop(path, None)
            if size is not None:
                self._bytes_on_disk -= size
            self.stats.invalid += 1
        _unlink(path)

    @property
    def num_files(self) -> int:
        return len(self._files)

    @property
    def bytes_on_disk(self) -> int:
        return self._bytes_on_disk

    def contains(self, block_hash: int) -> bool:
        """Whether the block is on disk (or on its way there): an index lookup, no IO."""
        return block_hash in self._pending or self._path(block_hash) in self._files

    # -- writing ---------------------------------------------------------------

    def save(self, entries: list[tuple[int, tuple[int, ...]]], blocks: list[int], wait: bool = False) -> None:
        """Copy blocks out of the cache now (they are about to be reused) and queue their files.

        ``entries`` are each block's (hash, tokens). Blocks already on disk are only marked
        recently used. When the staging buffer is full the call waits for the writer to make
        room, up to ``SAVE_WAIT_S`` without ``wait``, for as long as it takes with it (closing).
        """
        new = []
        for (block_hash, tokens), block in zip(entries, blocks):
            if block_hash in self._pending:
                continue
            if self._path(block_hash) in self._files:
                self._queue.put((block_hash, None, None))  # touch it: recently used
            else:
                new.append((block_hash, tokens, block))
        deadline = None if wait else time.monotonic() + SAVE_WAIT_S
        while new:
            with self._lock:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._pending_room.wait_for(lambda: self._free_slots, timeout)
                slots = [self._free_slots.pop() for _ in range(min(len(new), len(self._free_slots)))]
            if not slots:
                log.warning("KV offload: the writer is stuck; %d evicted blocks are not kept", len(new))
                self.stats.dropped += len(new)
                return
            batch, new = new[: len(slots)], new[len(slots) :]
            self._copy_out([block for _, _, block in batch], slots)
            for (block_hash, tokens, _), slot in zip(batch, slots):
                self._pending[block_hash] = (tokens, self._staging[slot])
                self._queue.put((block_hash, tokens, slot))

    def _copy_out(self, blocks: list[int], slots: list[int]) -> None:
        """The blocks' bytes into staging rows ``slots``, one copy per cache part."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.parts[0].device)
        rows = torch.tensor(slots, dtype=torch.long)
        at = 0
        for part in self.parts:
            self._staging[:, at : at + part.shape[1]].index_copy_(0, rows, part.index_select(0, index).cpu())
            at += part.shape[1]

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            block_hash, tokens, slot = item
            path = self._path(block_hash)
            if tokens is None:
                self._touch(path)
                continue
            try:
                size = _write_file(path, self.fingerprint, block_hash, tokens, self._staging[slot])
            except Exception as e:  # the thread must live on: evictions and close wait for its slots
                log.warning("KV offload: writing %s failed (%s); the block is not kept", path, e)
                size = None
            with self._lock:
                del self._pending[block_hash]
                self._free_slots.append(slot)
                self._pending_room.notify_all()
                if size is not None:
                    self.stats.writes += 1
                    old = self._files.pop(path, None)
                    self._files[path] = size
                    self._bytes_on_disk += size - (old or 0)
                    self._keep_budget()

    def _touch(self, path: str) -> None:
        with self._lock:
            if path not in self._files:
                return
            self._files.move_to_end(path)
        try:
            os.utime(path)
        except OSError:
            pass

    # -- reading ---------------------------------------------------------------

    def prefetch(self, hashes: list[int]) -> None:
        """Start reading these blocks' files (a queued request's prefix) so ``load`` finds them ready."""
        for block_hash in hashes:
            if block_hash not in self._prefetched and block_hash not in self._pending:
                self._prefetched[block_hash] = self._readers.submit(self._read, block_hash)
        while len(self._prefetched) * self.block_bytes > MAX_PREFETCH_BYTES:
            self._prefetched.popitem(last=False)[1].cancel()

    def load(self, entries: list[tuple[int, tuple[int, ...]]], blocks: list[int]) -> int:
        """Read blocks (hash, tokens) into cache blocks ``blocks``, in order; returns how many
        were read. The first one missing or bad ends the run: later blocks depend on it.
        Reads run ahead a window at a time; what is read goes into the cache a chunk at a time."""
        window = max(1, MAX_PREFETCH_BYTES // self.block_bytes)
        rows, loaded = [], 0
        for i, (block_hash, tokens) in enumerate(entries):
            if i % window == 0:
                self.prefetch([h for h, _ in entries[i : i + window]])
            found = self._take(block_hash)
            if found is None or found[0] != tokens:
                break
            rows.append(found[1])
            if len(rows) == self._load_buffer.shape[0]:
                self._copy_in(rows, blocks[loaded : loaded + len(rows)])
                loaded, rows = loaded + len(rows), []
        if rows:
            self._copy_in(rows, blocks[loaded : loaded + len(rows)])
            loaded += len(rows)
        for block_hash, _ in entries[loaded:]:
            future = self._prefetched.pop(block_hash, None)
            if future is not None:
                future.cancel()
        self.stats.hits += loaded
        return loaded

    def _take(self, block_hash: int) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """A block's (tokens, payload): still waiting to be written, read ahead, or read now."""
        pending = self._pending.get(block_hash)
        future = self._prefetched.pop(block_hash, None)
        if pending is not None:
            return pending
        if future is not None and not future.cancelled():
            return future.result()
        return self._read(block_hash)

    def _copy_in(self, rows: list[torch.Tensor], blocks: list[int]) -> None:
        """Payload rows into cache blocks, one copy per cache part."""
        buffer = torch.stack(rows, out=self._load_buffer[: len(rows)])
        index = torch.tensor(blocks, dtype=torch.long, device=self.parts[0].device)
        at = 0
        for part in self.parts:
            part.index_copy_(0, index, buffer[:, at : at + part.shape[1]].to(part.device))
            at += part.shape[1]

    def _read(self, block_hash: int) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """A block file's (tokens, payload), checked; None (and the file removed) if it is not sound."""
        path = self._path(block_hash)
        try:
            with open(path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                if f.readinto(data) != len(data):
                    raise ValueError("short read")
            tokens, payload = _parse_file(data, self.fingerprint, block_hash, self.block_bytes, self.word)
        except FileNotFoundError:
            with self._lock:
                self._files.pop(path, None)  # removed behind our back: a plain miss
            return None
        except (OSError, ValueError) as e:
            log.warning("KV offload: %s is not a sound block file (%s); removed", path, e)
            self._forget(path)
            return None
        self._touch(path)
        return tokens, payload

    def flush(self) -> None:
        """Wait until every block handed to ``save`` is written (benchmarks, tests)."""
        with self._lock:
            self._pending_room.wait_for(lambda: not self._pending)

    def close(self) -> None:
        """Finish every queued write and stop the threads."""
        if self.closed:
            return
        self.closed = True
        self._queue.put(None)
        self._writer.join()
        self._readers.shutdown(wait=True, cancel_futures=True)


def _write_file(path: str, fingerprint: bytes, block_hash: int, tokens: tuple[int, ...], payload: torch.Tensor) -> int:
    """Write a block file whole or not at all (a temporary name, then an atomic rename); its size."""
    token_bytes = struct.pack(f"<{len(tokens)}q", *tokens)
    data = memoryview(payload.numpy()).cast("B")
    crc = zlib.crc32(data, zlib.crc32(token_bytes))
    header = HEADER.pack(MAGIC, FORMAT_VERSION, fingerprint, block_hash.to_bytes(16, "little"), len(tokens),
                         len(data), crc).ljust(HEADER_BYTES, b"\0")
    temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(temp, "wb") as f:
            f.write(header)
            f.write(token_bytes)
            f.write(data)
        os.replace(temp, path)
    except OSError:
        _unlink(temp)
        raise
    return len(header) + len(token_bytes) + len(data)


def _parse_file(data: bytearray, fingerprint: bytes, block_hash: int, block_bytes: int,
                word: torch.dtype) -> tuple[tuple[int, ...], torch.Tensor]:
    """(tokens, payload in ``word``s) of a block file's bytes; ValueError says what is wrong."""
    if len(data) < HEADER_BYTES:
        raise ValueError("truncated header")
    magic, version, file_fingerprint, file_hash, num_tokens, payload_bytes, crc = HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise ValueError("not a cholla KV block file of this version")
    if file_fingerprint != fingerprint or file_hash != block_hash.to_bytes(16, "little"):
        raise ValueError("written for another model, cache layout or block")
    tokens_end = HEADER_BYTES + 8 * num_tokens
    if payload_bytes != block_bytes or len(data) != tokens_end + payload_bytes:
        raise ValueError("truncated or wrong length")
    view = memoryview(data)
    if zlib.crc32(view[tokens_end:], zlib.crc32(view[HEADER_BYTES:tokens_end])) != crc:
        raise ValueError("checksum mismatch")
    tokens = struct.unpack_from(f"<{num_tokens}q", data, HEADER_BYTES)
    return tokens, torch.frombuffer(data, dtype=word, offset=tokens_end, count=payload_bytes // word.itemsize)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
