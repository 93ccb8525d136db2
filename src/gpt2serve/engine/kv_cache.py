"""Blocks of the paged KV cache: which sequence holds which, what has been promised, and which
hold a prompt prefix that a later request may reuse.

The cache (model.KVCache) is a pool of fixed-size blocks; a sequence's block table lists the
blocks holding its positions in order. Blocks are allocated as a sequence grows and freed
when it ends; the n > 1 siblings of a prompt share its full blocks (reference counts) and
copy only its last, partly filled one.

A request is admitted only when every block it may need is available: its prompt's now, and
each sequence's growth up to its token limit as a reservation. So a running sequence never
waits for a block and nothing is ever preempted; the cost is that a sequence that stops early
held a promise it did not use, which is returned when it ends.

Where blocks lie matters to decode attention, which reads each sequence's blocks in table
order: consecutive blocks are one stream for the prefetchers and the TLB, scattered ones are
not (docs/benchmarks.md, "Block tables in order"). A free list handed blocks back in the
order sequences ended, so once a server had run a while every table was scattered. So a
prompt's new blocks are a run of free blocks with room after it for its sequence's growth,
which is kept for it (BlockManager._place), and a sequence grows into the block after its
last one, or else into a run with room for the rest of its growth.

Prefix caching (vLLM v1's design): a full block of prompt tokens, once read, and a block that
decode steps filled with a sequence's tokens, is known by a key chained over its tokens, every
token before it and the request's cache salt (`prefix_keys`, `block_key`). A new request
takes the longest run of known blocks its prompt starts with and reads only the rest. Known
blocks that no sequence holds stay in the cache, counted as available, and are evicted least
recently used first when a block is needed, or when a prompt finds no run of free blocks: the
blocks of one table are released together, so the oldest ones leave a run where they lay.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import math

import numpy as np
import torch

from .. import hardware, metrics
from ..model import GPTConfig, KVCache

log = logging.getLogger("gpt2serve.engine")


def prefix_keys(tokens: list[int], block_size: int, salt: str | None = None) -> list[bytes]:
    """The key of each full block of `tokens`: a digest of the previous block's key, the
    salt and the block's tokens, so two blocks share a key only if everything up to their
    end is the same (SHA-256: a collision would hand a request another prompt's keys and
    values)."""
    keys: list[bytes] = []
    full = len(tokens) // block_size * block_size
    ids = np.asarray(tokens[:full], dtype=np.int64)
    for start in range(0, full, block_size):
        keys.append(block_key(keys, ids[start:start + block_size], salt))
    return keys


def block_key(keys: list[bytes], tokens, salt: str | None = None) -> bytes:
    """The key of a full block of `tokens` after the blocks whose keys are `keys`: chained
    from the last of them, or for the first block from the salt. A byte says which, so that
    no salt (a tenant's own string) can stand for a block's key."""
    previous = b"k" + keys[-1] if keys else b"s" + (salt or "").encode()
    return hashlib.sha256(previous + np.asarray(tokens, dtype=np.int64).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int,
                 model_metrics: metrics.ModelMetrics | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.metrics = model_metrics or metrics.ModelMetrics()
        self._free = np.ones(num_blocks, dtype=bool)  # held by none, keeping no prompt
        self._free_count = num_blocks
        # Free blocks kept for the growth of a sequence, after its prompt's blocks: a hint,
        # which other tables follow unless nothing else is left.
        self._kept = np.zeros(num_blocks, dtype=bool)
        self._refs = [0] * num_blocks
        self.promised = 0  # blocks reserved for growth, not yet allocated
        self._by_key: dict[bytes, int] = {}  # known prompt blocks
        self._key_of: dict[int, bytes] = {}
        # known blocks no sequence holds, least recently released first
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def need(self, prompt_len: int, max_new: int, n: int) -> tuple[int, int]:
        """(blocks for the prompt, blocks to reserve for growth) of a request. The last new
        token is never fed back, so a sequence caches prompt_len + max_new - 1 positions; one
        that only reads its prompt (max_new 0) writes nothing after it, so its siblings share
        all of the prompt's blocks."""
        prompt = self.blocks_for(prompt_len)
        if max_new == 0:
            return prompt, 0
        total = max(prompt, self.blocks_for(prompt_len + max_new - 1))
        sibling = total - prompt_len // self.block_size  # shares only the full prompt blocks
        return prompt, (total - prompt) + (n - 1) * sibling

    @property
    def available(self) -> int:
        return self._free_count + len(self._idle) - self.promised

    def cached(self, keys: list[bytes]) -> list[int]:
        """The known blocks that the prompt with these block keys starts with."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def admit(self, prompt_blocks: int, growth: int, cached: list[int] = (), keep: int = 0
              ) -> list[int] | None:
        """The prompt's blocks, its first ones `cached` (shared), with growth reserved; None
        if they are not all available. The others are a run of free blocks (_place), and
        the `keep` blocks after them, if free too, are kept for the growth of the prompt's
        first sequence; with no such run, they are taken one by one."""
        idle = sum(1 for b in cached if not self._refs[b])  # (they stop being available)
        if prompt_blocks - len(cached) + idle + growth > self.available:
            return None
        for block in cached:  # first, so that taking the others cannot evict them
            if not self._refs[block]:
                del self._idle[block]
            self._refs[block] += 1
        self.promised += growth
        table, new = list(cached), prompt_blocks - len(cached)
        try:
            run = self._place(new, keep, table[-1] + 1 if table else None) if new else None
            if run is None:
                for _ in range(new):
                    table.append(self._take(self._after(table)))
                return table
            start, room = run
            for b in range(start, start + new):
                table.append(self._take(b))
        except BaseException:  # (a bug of ours: the request fails, the books stay right)
            self.release(table)
            self.promised -= growth
            raise
        self._kept[start + new:start + room] = True
        return table

    def remember(self, block: int, key: bytes) -> None:
        """A block now holds the prompt prefix `key` names (unless another block already
        does, e.g. one read at the same time by another request)."""
        if key not in self._by_key and block not in self._key_of:
            self._by_key[key], self._key_of[block] = block, key

    def grow(self, table: list[int], left: int = 1) -> int:
        """A block from a reservation made at admission, for the sequence whose blocks are
        `table` and that may take `left` blocks more, this one included: the one after its
        last when that is free (as a rule, kept for it), else the first of a run of free
        blocks that holds them all, the others kept for it."""
        block, keep = self._after(table), 0
        if block is None and left > 1:
            block = self._first_run(self._open(), left)
            keep = 0 if block is None else left - 1
        block = self._take(block)
        self.promised -= 1  # (once taken: a failure leaves the reservation whole)
        self._kept[block + 1:block + 1 + keep] = True
        return block

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: list[int], unused_promise: int = 0) -> None:
        """The blocks of a table that ends, and the growth it was promised and did not take:
        the blocks kept after its last one are kept no more."""
        for b in blocks:
            self._refs[b] -= 1
            if not self._refs[b]:
                if b in self._key_of:
                    self._idle[b] = None  # kept, until its room is needed
                else:
                    self._free[b] = True
                    self._free_count += 1
        after = blocks[-1] + 1 if blocks else len(self._kept)
        for b in range(after, min(after + unused_promise, len(self._kept))):
            if not self._kept[b]:
                break
            self._kept[b] = False
        self.promised -= unused_promise
        self._report()

    def set_aside(self) -> int:
        """A block out of the pool for good (the CUDA graphs' scratch block): capacity and
        usage count the others."""
        block = self._take()
        self.num_blocks -= 1
        self._report()
        return block

    def _place(self, new: int, keep: int, after: int | None) -> tuple[int, int] | None:
        """(first block, blocks in all) of a run of free blocks for a prompt's `new` blocks
        and as many of the `keep` after them as are free: the run that goes on from the
        prompt's cached blocks (`after`), else the first; one with room for all `keep` if
        there is one, else one without. With no free run at all, known blocks are evicted in
        turn (least recently used first), at most as many as the request may take, until
        the room one leaves, with the free blocks beside it, holds new + keep (a table's
        blocks were released together and lie together); else the first run that holds
        `new`, if the evictions made one."""
        open_blocks = self._open()
        counts = (new + keep, new) if keep else (new,)
        for count in counts:
            start = self._first_run(open_blocks, count, after)
            if start is not None:
                return start, count
        for block in list(itertools.islice(self._idle, new + keep)):
            self._evict(block)
            lo = hi = block
            while self._is_open(lo - 1):
                lo -= 1
            while self._is_open(hi + 1):
                hi += 1
            if hi - lo + 1 >= new + keep:
                return lo, new + keep
        start = self._first_run(self._open(), new, after)
        if start is None:
            return None
        room = new  # and what free blocks follow it, for some of the growth
        while room < new + keep and self._is_open(start + room):
            room += 1
        return start, room

    def _open(self) -> np.ndarray:
        """Which blocks are free and kept for no sequence's growth."""
        return self._free & ~self._kept

    def _is_open(self, block: int) -> bool:
        return 0 <= block < len(self._free) and self._free[block] and not self._kept[block]

    @staticmethod
    def _first_run(pool: np.ndarray, count: int, after: int | None = None) -> int | None:
        """The first block of a run of `count` blocks of the pool: the one that starts at
        `after` if there is one, else the first."""
        total = np.concatenate(([0], np.cumsum(pool, dtype=np.int64)))
        if total[-1] < count:
            return None
        runs = total[count:] - total[:-count] == count
        if after is not None and after < len(runs) and runs[after]:
            return after
        starts = np.flatnonzero(runs)
        return int(starts[0]) if starts.size else None

    def _after(self, table: list[int]) -> int | None:
        """The block after the table's last, if it is free (kept for this table, as a rule)."""
        after = table[-1] + 1 if table else len(self._free)
        return after if after < len(self._free) and self._free[after] else None

    def _evict(self, block: int) -> None:
        """An idle known block forgets its prefix and is free."""
        del self._idle[block]
        del self._by_key[self._key_of.pop(block)]
        self._free[block] = True
        self._free_count += 1

    def _take(self, block: int | None = None) -> int:
        """`block` (a free one), else the first free block, else the known block released
        longest ago, evicted; a block kept for another's growth only if nothing else is
        left."""
        if block is None:
            open_blocks = self._open()
            if open_blocks.any():
                block = int(np.argmax(open_blocks))
            elif self._idle:
                block = next(iter(self._idle))
                self._evict(block)
            elif self._free_count:
                block = int(np.argmax(self._free))
            else:  # (admission reserves every block a sequence takes: a bug of ours)
                raise RuntimeError("no KV-cache block is free: more were taken than reserved")
        self._free[block] = self._kept[block] = False
        self._free_count -= 1
        self._refs[block] = 1
        self._report()
        return block

    def _report(self) -> None:
        self.metrics.kv_cache_usage.set(1 - (self._free_count + len(self._idle)) / self.num_blocks)


class KVBudgetError(ValueError):
    """The KV-cache budget cannot hold one full-context sequence: a start-up error."""


# Without --kv_cache_memory: this share of the memory still available once the weights are
# loaded (the rest is left for activations, the server and the OS; on CPU, the peak stays
# well under the machine's RAM), and on CUDA of the device's free memory (vLLM's
# --gpu-memory-utilization is the same idea, counted against the whole device).
CPU_MEMORY_SHARE = 0.6
GPU_MEMORY_SHARE = 0.9
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
              "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of "600MiB", "4GiB", "1.5GB" or "123456": at least one, and finite (inf, nan and
    1e400 raised OverflowError, and 0.5 was 0 bytes)."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        value = math.nan
    if not 1 <= value < math.inf:
        raise ValueError(f"{text!r} is not a size (a number of bytes, at least 1, or a number "
                         f"with KiB, MiB, GiB, TiB, KB, MB, GB or TB)")
    return int(value)


def machine_budget(device: torch.device, cpu_share: float = CPU_MEMORY_SHARE,
                   gpu_share: float = GPU_MEMORY_SHARE) -> int | None:
    """This share of the memory still available: the container's on CPU, the device's free
    memory on CUDA (None: unknown). By default, the KV-cache budget this machine allows once
    the weights are loaded."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * gpu_share)
    available = hardware.memory_available()
    return None if available is None else int(available * cpu_share)


def blocks_in(budget: int, config: GPTConfig, dtype: torch.dtype, block_size: int,
              context: int, source: str = "--kv_cache_memory") -> int:
    """The blocks `budget` bytes hold; KVBudgetError if they cannot hold one `context`-token
    sequence (`source`: where the budget came from, for the message)."""
    per_block = KVCache.block_bytes(config, block_size, dtype)
    num_blocks = budget // per_block
    per_sequence = -(-context // block_size)
    if num_blocks < per_sequence:
        raise KVBudgetError(
            f"KV cache budget {_mib(budget)} ({source}) cannot hold one {context}-token "
            f"sequence, which needs {_mib(per_sequence * per_block)} of "
            f"{str(dtype).removeprefix('torch.')}: give more with --kv_cache_memory, or a "
            f"machine with more memory")
    return num_blocks


def _mib(n: int) -> str:
    """n bytes in MiB, with two decimals below 10 (a budget of 256 KiB read "0 MiB")."""
    return f"{n / 2**20:.{2 if n < 10 * 2**20 else 0}f} MiB"


def full_sequences_bytes(config: GPTConfig, dtype: torch.dtype, block_size: int,
                         sequences: int, context: int) -> int:
    """The bytes `sequences` full-context sequences take, each in whole blocks of its own."""
    return sequences * -(-context // block_size) * KVCache.block_bytes(config, block_size, dtype)


def allocate(config: GPTConfig, dtype: torch.dtype, device: torch.device, block_size: int,
             budget: int | None, max_sequences: int, context: int) -> KVCache:
    """The cache for `budget` bytes, never more than `max_sequences` (--max_batch_size)
    full-context sequences hold; by default as much of that as the machine allows.
    KVBudgetError when it cannot hold one full-context sequence."""
    usable = full_sequences_bytes(config, dtype, block_size, max_sequences, context)
    source = "--kv_cache_memory"
    if budget is not None and budget > usable:
        budget, source = usable, "--kv_cache_memory, capped at --max_batch_size full sequences"
    if budget is None:
        budget, source = usable, "--max_batch_size"
        allowed = machine_budget(device)
        if allowed is not None and allowed < budget:
            share = GPU_MEMORY_SHARE if device.type == "cuda" else CPU_MEMORY_SHARE
            budget, source = allowed, f"{share:.0%} of the memory left after the weights"
    num_blocks = blocks_in(budget, config, dtype, block_size, context, source)
    per_sequence = -(-context // block_size)
    cache = KVCache(config, num_blocks, block_size, dtype, device)
    log.info("KV cache: %.0f MiB (%s) on %s, %s: %d blocks of %d tokens = %d tokens, "
             "%.1f full-context (%d-token) sequences", cache.nbytes / 2**20, source, device,
             str(dtype).removeprefix("torch."), num_blocks, block_size,
             num_blocks * block_size, num_blocks / per_sequence, context)
    return cache
