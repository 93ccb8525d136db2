"""Fast FP32 on CPU: the linear layers and the LM head in oneDNN's packed weight format.

A decode step at small batch is a chain of matrix-vector products that must stream every
weight from memory. `addmm` with HF's [in, out] layout streams them at about half the
machine's read bandwidth; oneDNN's inner product on weights reordered once at load reaches
it, up to batch 32 (docs/benchmarks.md). Results are the same fp32 arithmetic, up to
summation order.

The packed head cannot be indexed by token, so the embedding keeps its own [V, D] rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import Conv1D, TiedHead

# oneDNN picks a blocked layout for an expected batch size; 32 was as fast as the best choice
# at every batch from 1 to 32.
BATCH_HINT = 32


def available() -> bool:
    return torch.backends.mkldnn.is_available()


def _pack(weight_out_in: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), BATCH_HINT)


class PackedLinear(nn.Module):
    """Drop-in for Conv1D (y = x @ W + b) with W packed for oneDNN."""

    def __init__(self, conv: Conv1D):
        super().__init__()
        weight = conv.weight.detach()
        self.register_buffer("packed", _pack(weight.t()), persistent=False)
        self.register_buffer("bias", conv.bias.detach().clone(), persistent=False)
        self.nbytes = weight.nbytes + self.bias.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PackedHead(nn.Module):
    """Drop-in for TiedHead: packed [V, D] for the logits, plain [V, D] rows to embed."""

    def __init__(self, head: TiedHead):
        super().__init__()
        rows = head.weight_t.detach().t().contiguous()
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("packed", _pack(rows), persistent=False)
        self.nbytes = rows.nbytes

    def embed(self, tokens: Tensor) -> Tensor:
        return nn.functional.embedding(tokens, self.rows)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed, None, "none", [], "")
