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

Prefix caching (vLLM v1's design): a full block of prompt tokens, once read, is known by a key
chained over its tokens, every token before it and the request's cache salt
(`prefix_keys`). A new request takes the longest run of known blocks its prompt starts with
and reads only the rest. Known blocks that no sequence holds stay in the cache, counted as
available, and are evicted least recently used first when a block is needed.
"""

from __future__ import annotations

import collections
import hashlib
import logging

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
    keys, previous = [], (salt or "").encode()
    full = len(tokens) // block_size * block_size
    ids = np.asarray(tokens[:full], dtype=np.int64)
    for start in range(0, full, block_size):
        previous = hashlib.sha256(previous + ids[start:start + block_size].tobytes()).digest()
        keys.append(previous)
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int,
                 model_metrics: metrics.ModelMetrics | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.metrics = model_metrics or metrics.ModelMetrics()
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
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
        token is never fed back, so a sequence caches prompt_len + max_new - 1 positions."""
        prompt = self.blocks_for(prompt_len)
        total = max(prompt, self.blocks_for(prompt_len + max_new - 1))
        sibling = total - prompt_len // self.block_size  # shares only the full prompt blocks
        return prompt, (total - prompt) + (n - 1) * sibling

    @property
    def available(self) -> int:
        return len(self._free) + len(self._idle) - self.promised

    def cached(self, keys: list[bytes]) -> list[int]:
        """The known blocks that the prompt with these block keys starts with."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def admit(self, prompt_blocks: int, growth: int, cached: list[int] = ()
              ) -> list[int] | None:
        """The prompt's blocks, its first ones `cached` (shared), with growth reserved; None
        if they are not all available."""
        idle = sum(1 for b in cached if not self._refs[b])  # (they stop being available)
        if prompt_blocks - len(cached) + idle + growth > self.available:
            return None
        for block in cached:  # first, so that taking the others cannot evict them
            if not self._refs[block]:
                del self._idle[block]
            self._refs[block] += 1
        self.promised += growth
        return list(cached) + [self._take() for _ in range(prompt_blocks - len(cached))]

    def remember(self, block: int, key: bytes) -> None:
        """A block now holds the prompt prefix `key` names (unless another block already
        does, e.g. one read at the same time by another request)."""
        if key not in self._by_key and block not in self._key_of:
            self._by_key[key], self._key_of[block] = block, key

    def grow(self) -> int:
        """A block from a reservation made at admission."""
        self.promised -= 1
        return self._take()

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: list[int], unused_promise: int = 0) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if not self._refs[b]:
                if b in self._key_of:
                    self._idle[b] = None  # kept, until its room is needed
                else:
                    self._free.append(b)
        self.promised -= unused_promise
        self._report()

    def set_aside(self) -> int:
        """A block out of the pool for good (the CUDA graphs' scratch block): capacity and
        usage count the others."""
        block = self._take()
        self.num_blocks -= 1
        self._report()
        return block

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the known block released longest ago
            block, _ = self._idle.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
        self._refs[block] = 1
        self._report()
        return block

    def _report(self) -> None:
        self.metrics.kv_cache_usage.set(1 - (len(self._free) + len(self._idle)) / self.num_blocks)


class KVBudgetError(ValueError):
    """The KV-cache budget cannot hold one full-context sequence: a start-up error."""


# Without --kv_cache_memory: this share of the memory still available once the weights are
# loaded (the rest is left for activations, the server and the OS; on CPU, the peak stays
# well under the machine's RAM), and on CUDA of the device's free memory (vLLM's
# --gpu-memory-utilization is the same idea, counted against the whole device).
CPU_MEMORY_SHARE = 0.6
GPU_MEMORY_SHARE = 0.9
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
              "g": 10**9, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of "600MiB", "4GiB", "1.5GB" or "123456"."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in SIZE_UNITS or value <= 0:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with KiB, MiB, GiB, "
                         f"KB, MB or GB)")
    return int(value * SIZE_UNITS[unit])


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


def allocate(config: GPTConfig, dtype: torch.dtype, device: torch.device, block_size: int,
             budget: int | None, wanted_tokens: int, context: int) -> KVCache:
    """The cache for `budget` bytes, never more than `wanted_tokens` (the most that
    --max_batch_size sequences can hold); by default as much of that as the machine allows.
    KVBudgetError when it cannot hold one full-context sequence."""
    per_block = KVCache.block_bytes(config, block_size, dtype)
    usable = -(-wanted_tokens // block_size) * per_block
    source = "--kv_cache_memory"
    if budget is not None and budget > usable:
        budget, source = usable, "--kv_cache_memory, capped at --max_batch_size full sequences"
    if budget is None:
        budget, source = usable, "--max_batch_size"
        allowed = machine_budget(device)
        if allowed is not None and allowed < budget:
            share = GPU_MEMORY_SHARE if device.type == "cuda" else CPU_MEMORY_SHARE
            budget, source = allowed, f"{share:.0%} of the memory left after the weights"
    num_blocks = budget // per_block
    per_sequence = -(-context // block_size)
    if num_blocks < per_sequence:
        raise KVBudgetError(
            f"KV cache budget {budget / 2**20:.0f} MiB ({source}) cannot hold one "
            f"{context}-token sequence, which needs {per_sequence * per_block / 2**20:.0f} MiB "
            f"of {str(dtype).removeprefix('torch.')}: give more with --kv_cache_memory, or a "
            f"machine with more memory")
    cache = KVCache(config, num_blocks, block_size, dtype, device)
    log.info("KV cache: %.0f MiB (%s) on %s, %s: %d blocks of %d tokens = %d tokens, "
             "%.1f full-context (%d-token) sequences", cache.nbytes / 2**20, source, device,
             str(dtype).removeprefix("torch."), num_blocks, block_size,
             num_blocks * block_size, num_blocks / per_sequence, context)
    return cache
