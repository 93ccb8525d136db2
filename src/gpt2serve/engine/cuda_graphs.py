"""Decode steps replayed as CUDA graphs.

On a GPU, a decode step is some 15 small kernels a layer, and at batch 1 to 32 launching
them one by one from Python takes far longer than running them: an eager step is many times
the time it takes to read the weights (docs/benchmarks.md, "On a GPU"; bench/gpu.py). A CUDA
graph launches a whole step, head included, at once.

A graph replays fixed shapes on fixed addresses, so a step is padded up to one of a few
captured shapes: its batch to the next of BATCH_SIZES, the positions it attends to to the
next power of two (model.Group's `span`; positions past a row's own are masked). Padding
rows read token 0 at position 0 and write their keys and values to a block of their own,
which the engine takes from the cache for good; their logits are dropped. Each shape is
captured when first needed (two eager passes, then the capture) and all share one memory pool:
a step's outputs are consumed before the next step replays.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import GPT, KVCache

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_SPAN = 64  # positions; shorter sequences attend over this many, masked


class DecodeGraphs:
    def __init__(self, model: GPT, cache: KVCache, max_batch_size: int, context: int,
                 scratch_block: int, capture: bool = True):
        """`scratch_block`: a cache block no sequence will get. `capture=False` runs the
        same padded, fixed-shape steps eagerly (on a CPU, to test them)."""
        self.model, self.cache, self.capture = model, cache, capture
        self.width = -(-context // cache.block_size)
        self.scratch = scratch_block
        self.batch_sizes = [b for b in BATCH_SIZES if b < max_batch_size] + [max_batch_size]
        span, self.spans = MIN_SPAN, []
        while span < context:
            self.spans.append(span)
            span *= 2
        self.spans.append(self.width * cache.block_size)
        # One host-to-device copy a step: [token, position, block table...] per row.
        self.inputs = torch.zeros(max_batch_size, 2 + self.width, dtype=torch.long,
                                  device=cache.kv.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None

    @torch.inference_mode()  # (the inputs are inference tensors if made in that mode)
    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> Tensor:
        """Logits [n, V] of n decode rows: token i at positions[i], cached through the
        block table tables[i]."""
        n = len(tokens)
        batch = next(b for b in self.batch_sizes if b >= n)
        span = next(s for s in self.spans if s > max(positions))
        rows = [[token, pos, *table, *[self.scratch] * (self.width - len(table))]
                for token, pos, table in zip(tokens, positions, tables)]
        rows += [[0, 0, *[self.scratch] * self.width]] * (batch - n)
        self.inputs[:batch].copy_(torch.tensor(rows))
        if not self.capture:
            return self._step(batch, span)[:n]
        key = (batch, span)
        if key not in self._graphs:
            self._graphs[key] = self._record(batch, span)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:n]

    def _step(self, batch: int, span: int) -> Tensor:
        rows = self.inputs[:batch]
        return self.model.decode_step(rows[:, 0], rows[:, 1], self.cache, rows[:, 2:], span)

    def _record(self, batch: int, span: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Capture a step of this shape. The warm-up passes on a side stream (as torch asks)
        compute the step about to be replayed: they store the same keys and values."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(batch, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this (the step) thread's CUDA calls matter to the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._step(batch, span)
        self._pool = graph.pool()
        return graph, logits
