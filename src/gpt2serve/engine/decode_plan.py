"""Decode steps on CPU as a fixed list of kernel calls: the CPU counterpart of cuda_graphs.py.

With fused layers (packing.FusedBlock, fp32 or int8), a decode step of GPT-2 124M is 62
calls into _kernels.c where our kernels were chosen (61, and the head's). Made eagerly, each
call also allocates its outputs, checks its inputs and turns tensors into addresses, in
Python, and meanwhile no weight streams from memory. A plan binds those calls once per batch
size to buffers of its own (kernels.bind_*); a step refills the buffers and replays them
(what that gains: docs/benchmarks.md, "Why it is fast"), each layer's calls into our kernels
run by one team of threads (kernels.together). The arithmetic is the eager step's,
call for call, so the logits are the same to the bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import kernels
from ..model import GPT, KVCache, inference
from ..packing import FusedBlock


class DecodePlan:
    def __init__(self, model: GPT, cache: KVCache, max_batch_size: int, context: int):
        cfg = model.config
        B, D = max_batch_size, cfg.n_embd
        self.model, self.cache = model, cache
        # Block tables as wide as the context: attention reads a row's table only up to its
        # own position, so the padding is never read.
        self.tables = torch.zeros(B, -(-context // cache.block_size), dtype=torch.long)
        self.tokens = torch.zeros(B, dtype=torch.long)
        self.positions = torch.zeros(B, dtype=torch.long)
        # Written through numpy's views of them, and embedded by one call (bind_embed): the
        # dozen torch ops this took ran cache-cold, after the step before had streamed the
        # weights through, at tens of microseconds each. In one process, alternating runs of
        # 64 greedy tokens at batch 1 (int8 124M, an AMD EPYC Zen 4), the step was 1.06x faster.
        self._inputs = self.tokens.numpy(), self.positions.numpy(), self.tables.numpy()
        self.x = torch.zeros(2, B, D)  # the residual stream: a layer's input, then + attention
        self.qkv, self.attended = torch.zeros(B, 3 * D), torch.zeros(B, D)
        self.mlp = torch.zeros(B, cfg.mlp_dim)
        self.normed = torch.zeros(B, D)  # a layer norm's output, read by its matmul
        self.logits_rows = torch.zeros(B, cfg.vocab_size)
        # by batch size: the embedding's call, each layer's calls, the head's call
        self._calls: dict[int, tuple[Callable[[], None], list[list[Callable[[], None]]],
                                     Callable[[], None]]] = {}

    @staticmethod
    def serves(model: GPT, cache: KVCache) -> bool:
        """Whether every layer is a FusedBlock (its matmuls laid out for their kernels, fp32
        or int8) and attention runs in our kernel."""
        return (all(isinstance(b.fused, FusedBlock) for b in model.h)
                and kernels.runs_decode_attention(cache.kv, torch.float32))

    @inference
    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]],
            between_layers: Callable[[], None] | None = None) -> Tensor:
        """Hidden states [n, D] of n decode rows, for `logits` (or the head's screen): token
        i at positions[i], cached through the block table tables[i]. `between_layers` as in
        GPT.forward. The rows are the plan's buffer, overwritten by the next run."""
        n = len(tokens)
        token_ids, at, block_tables = self._inputs
        token_ids[:n], at[:n] = tokens, positions
        for row, table in enumerate(tables):
            block_tables[row, :len(table)] = table
        embed, layers, _ = self._calls.get(n) or self._bind(n)
        embed()
        for layer in layers:
            for call in layer:
                call()
            if between_layers is not None:
                between_layers()
        return self.x[0, :n]

    def logits(self, n: int) -> Tensor:
        """GPT.logits [n, V] of the last run's n rows: the head's call (its layer norm
        fused, as GPT.logits has it) bound to the plan's buffers, overwritten by the next
        call; its torch ops, made eagerly, ran cache-cold as the embedding's did (1.01-1.02x
        a step, measured as above)."""
        self._calls[n][2]()
        return self.logits_rows[:n]

    def _bind(self, n: int) -> tuple[Callable[[], None], list[list[Callable[[], None]]],
                                     Callable[[], None]]:
        """The calls for n rows: the embedding's, into x[0]; each layer's
        (FusedBlock.bind), which reads x[0] and leaves its output there; the head's, from
        x[0] to logits_rows."""
        x, normed = self.x[:, :n], self.normed[:n]
        qkv, attended, mlp = self.qkv[:n], self.attended[:n], self.mlp[:n]
        tables, positions = self.tables[:n], self.positions[:n]
        layers = [kernels.together(block.fused.bind(
                      x[0], x[1], normed, qkv, attended, mlp,
                      kernels.bind_decode_attention(qkv, kv, tables, positions, block.scale,
                                                    attended)))
                  for block, kv in zip(self.model.h, self.cache.kv)]
        embed = self.model.head.bind_embed(x[0], self.tokens[:n], positions, self.model.wpe.weight)
        head = self.model.head.matmul.bind(x[0], self.logits_rows[:n], ln=self.model.ln_f,
                                           normed=normed)
        self._calls[n] = embed, layers, head
        return self._calls[n]
