"""Fast FP32 on CPU: the linear layers and the LM head, their weights laid out once, at load,
for the kernel that multiplies them.

A decode step at small batch is a chain of matrix-vector products that must stream every
weight from memory. `addmm` with HF's [in, out] layout streams them at about half the
machine's read bandwidth. Where AVX2 runs, our kernel (kernels.linear_f32) reads panels of
16 outputs from huge pages, one sequential stream per thread, for decode steps and prompts
alike; elsewhere oneDNN's inner product on weights it reordered (docs/benchmarks.md compares
them). Results are the same fp32 arithmetic, up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import kernels
from .model import GPT, Block, Conv1D, TiedHead

# oneDNN picks a blocked layout for an expected batch size; 32 was as fast as the best choice
# at every batch from 1 to 32.
BATCH_HINT = 32


def available() -> bool:
    return kernels.F32_RUNS or torch.backends.mkldnn.is_available()


class Fp32Matmul:
    """x @ W + bias for W [k, n] (Conv1D's layout), in our kernel's panels or oneDNN's
    packed layout (see module doc)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.bias, self.n = bias, weight.shape[1]
        if kernels.F32_RUNS:
            self.panels = kernels.pack_f32(weight)
        else:
            self.panels = None
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(),
                                                                  BATCH_HINT)

    def __call__(self, x: Tensor, **fused) -> Tensor:
        """`fused`: what kernels.linear_f32 does around the product (ours only)."""
        if self.panels is not None:
            return kernels.linear_f32(x, self.panels, self.bias, self.n, **fused)
        if fused:  # (fuse_blocks gives FusedBlocks only where our kernel runs)
            raise ValueError(f"oneDNN's matmul cannot also do {sorted(fused)}")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def bind(self, x: Tensor, y: Tensor, **fused) -> Callable[[], None]:
        """This product into y, as a call bound to x's and y's memory (ours only; see
        kernels.bind_linear_f32)."""
        return kernels.bind_linear_f32(x, self.panels, self.bias, y, **fused)


class PackedLinear(nn.Module):
    """Drop-in for Conv1D (y = x @ W + b) with W laid out for its kernel."""

    def __init__(self, conv: Conv1D):
        super().__init__()
        weight = conv.weight.detach()
        self.matmul = Fp32Matmul(weight, conv.bias.detach().clone())
        self.nbytes = weight.nbytes + conv.bias.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x)


class PackedHead(nn.Module):
    """Drop-in for TiedHead: the logits from the laid-out matrix, which also gives the
    embedding's rows where it is ours; oneDNN's packed one cannot be indexed by token, so
    there the embedding keeps a plain [V, D] copy."""

    def __init__(self, head: TiedHead):
        super().__init__()
        weight = head.weight_t.detach()
        self.matmul = Fp32Matmul(weight, None)
        self.rows = None if self.matmul.panels is not None else weight.t().contiguous()
        self.nbytes = weight.nbytes

    def embed(self, tokens: Tensor) -> Tensor:
        if self.rows is None:
            return kernels.f32_columns(self.matmul.panels, tokens)
        return nn.functional.embedding(tokens, self.rows)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.matmul(hidden)


# The activations that are GELU's tanh form, which kernels.linear_f32 applies itself.
TANH_GELU = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


class FusedBlock:
    """A Block's small ops done inside the calls of its matmuls to our kernel: each layer
    norm as its matmul reads its input, GELU and the residual adds as their matmul writes
    its output. Five calls a layer instead of a dozen ops, which with the Python around
    them cost about 1 ms of GPT-2 124M's 13.5 ms batch-1 decode step: +4-5.5% tok/s
    (docs/benchmarks.md)."""

    def __init__(self, block: Block):
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.c_attn, self.attn_proj = block.attn.c_attn.matmul, block.attn.c_proj.matmul
        self.c_fc, self.mlp_proj = block.mlp.c_fc.matmul, block.mlp.c_proj.matmul

    def __call__(self, x: Tensor, attend) -> Tensor:
        x = self.attn_proj(attend(self.c_attn(x, ln=self.ln_1)), residual=x)
        return self.mlp_proj(self.c_fc(x, ln=self.ln_2, gelu=True), residual=x)

    def bind(self, x: Tensor, after_attention: Tensor, normed: Tensor, qkv: Tensor,
             attended: Tensor, mlp: Tensor, attend: Callable[[], None]
             ) -> list[Callable[[], None]]:
        """The calls of __call__, bound to buffers (engine/decode_plan.py): the layer reads x
        and leaves its output there; `attend` is attention bound from qkv to attended."""
        return [self.c_attn.bind(x, qkv, ln=self.ln_1, normed=normed),
                attend,
                self.attn_proj.bind(attended, after_attention, residual=x),
                self.c_fc.bind(after_attention, mlp, ln=self.ln_2, gelu=True, normed=normed),
                self.mlp_proj.bind(mlp, x, residual=after_attention)]


def fuse_blocks(model: GPT) -> None:
    """Give every block a FusedBlock where our kernel serves its matmuls."""
    if kernels.F32_RUNS and model.config.activation_function in TANH_GELU:
        for block in model.h:
            block.fused = FusedBlock(block)
