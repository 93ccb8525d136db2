"""Decode steps on CPU as a fixed list of kernel calls: the CPU counterpart of cuda_graphs.py.

With fused layers (packing.FusedBlock, fp32 or int8), a decode step of GPT-2 124M is 61 calls,
into _kernels.c where our kernels were chosen. Made eagerly, each call also allocates its outputs, checks its inputs and turns
tensors into addresses, in Python, and meanwhile no weight streams from memory. A plan binds
those calls once per batch size to buffers of its own (kernels.bind_*); a step refills the
buffers and replays them (what that gains: docs/benchmarks.md, "Why it is fast"). The
arithmetic is the eager step's, call for call, so the logits are
the same to the bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import kernels
from ..model import GPT, KVCache
from ..packing import FusedBlock


class DecodePlan:
    def __init__(self, model: GPT, cache: KVCache, max_batch_size: int, context: int):
        cfg = model.config
        B, D = max_batch_size, cfg.n_embd
        self.model, self.cache = model, cache
        # Block tables as wide as the context: attention reads a row's table only up to its
        # own position, so the padding is never read.
        self.tables = torch.zeros(B, -(-context // cache.block_size), dtype=torch.long)
        self.positions = torch.zeros(B, dtype=torch.long)
        self.x = torch.zeros(2, B, D)  # the residual stream: a layer's input, then + attention
        self.qkv, self.attended = torch.zeros(B, 3 * D), torch.zeros(B, D)
        self.mlp = torch.zeros(B, cfg.mlp_dim)
        self.normed = torch.zeros(B, D)  # a layer norm's output, read by its matmul
        self._layers: dict[int, list[list[Callable[[], None]]]] = {}  # by batch size

    @staticmethod
    def serves(model: GPT, cache: KVCache) -> bool:
        """Whether every layer is a FusedBlock (its matmuls laid out for their kernels, fp32
        or int8) and attention runs in our kernel."""
        return (all(isinstance(b.fused, FusedBlock) for b in model.h)
                and kernels.runs_decode_attention(cache.kv))

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]],
            between_layers: Callable[[], None] | None = None) -> Tensor:
        """Hidden states [n, D] of n decode rows, for GPT.logits (or the head's screen): token
        i at positions[i], cached through the block table tables[i]. `between_layers` as in
        GPT.forward. The rows are the plan's buffer, overwritten by the next run."""
        n = len(tokens)
        width = self.tables.shape[1]
        self.tables[:n] = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        self.positions[:n] = torch.tensor(positions)
        torch.add(self.model.head.embed(torch.tensor(tokens)),
                  self.model.wpe.weight[self.positions[:n]], out=self.x[0, :n])
        for layer in self._layers.get(n) or self._bind(n):
            for call in layer:
                call()
            if between_layers is not None:
                between_layers()
        return self.x[0, :n]

    def _bind(self, n: int) -> list[list[Callable[[], None]]]:
        """Each layer's calls for n rows (FusedBlock.bind): a layer reads x[0] and leaves its
        output there."""
        x, normed = self.x[:, :n], self.normed[:n]
        qkv, attended, mlp = self.qkv[:n], self.attended[:n], self.mlp[:n]
        tables, positions = self.tables[:n], self.positions[:n]
        layers = [block.fused.bind(x[0], x[1], normed, qkv, attended, mlp,
                                   kernels.bind_decode_attention(qkv, kv, tables, positions,
                                                                 block.scale, attended))
                  for block, kv in zip(self.model.h, self.cache.kv)]
        self._layers[n] = layers
        return layers
