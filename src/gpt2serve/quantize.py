"""`--quantize int8` and `--quantize int4`: quantized weights on CPU.

int8: weights with per-channel scales.

Every linear layer and the tied embedding / LM head are quantized once, at load, per output
channel. Activations are quantized per call to u8, by the kernel chosen for the call's
number of rows (kernel_choice.py, matmul.py): ours (kernels.int8_linear, each row with its
own scale), fbgemm's or oneDNN's dynamic int8 GEMM (per tensor), or torch's weight-only
matmul. A layer holds its weights in the layout of each kernel chosen for it, and ours
wherever it runs: the embedding reads its rows from the head's copy in that layout.

int4: each linear layer's weights in groups of 32 inputs, w = scale * (q - 8) with q in 0..15
and an fp16 scale a group, searched for the least error (kernels.quantize_int4): 4.5 bits a
weight, as llama.cpp's q4_0. The tied embedding / LM head stays int8 (Int8TiedHead), as
llama.cpp keeps its output matrix at 6 bits: in 4 bits it cost the most of any matrix,
top-1 agreement with fp32 on the demo model 96.8% -> 93.4% (docs/benchmarks.md, "4-bit
quality"). Every layer is int4: the first and last in int8 as well gained agreement (98.3%
on the demo model's four layers) but read 8% more bytes a token of GPT-2 124M.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import hardware, kernels
from .kernel_choice import KernelTable
from .model import Conv1D, TiedHead


# Without VNNI, fbgemm multiplies u8 activations by s8 weights in pairs summed into int16
# (vpmaddubsw), which saturates when 2 * 255 * |w| > 32767. torch.ao avoids that by giving
# activations 7 bits (`reduce_range`); weights of 7 bits (|w| <= 63) avoid it too and keep
# more accuracy (top-1 agreement with fp32 in docs/benchmarks.md, "int8 quality"). VNNI is
# what fbgemm will use, not what the CPU has: FBGEMM_ENABLE_INSTRUCTIONS=AVX2 takes it away on
# a VNNI host, and AVX-VNNI without AVX-512 has no fbgemm kernel (hardware.int8_weight_levels).
WEIGHT_LEVELS = hardware.int8_weight_levels()


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: w [out, in] -> (qweight, scales [out])."""
    w = w.float()
    # the largest |w| of each row, without an |w| copy of the matrix (loading's peak memory)
    scales = (torch.linalg.vector_norm(w, ord=float("inf"), dim=1) / WEIGHT_LEVELS
              ).clamp(min=1e-12)
    # (a quantized tensor: its deprecation warning is filtered in matmul.py)
    q = torch.quantize_per_channel(w, scales.double(), torch.zeros(w.shape[0], dtype=torch.long),
                                   axis=0, dtype=torch.qint8)
    return q, scales


class Int8Linear(nn.Module):
    """Drop-in for Conv1D: y = x @ W + b with W held as per-channel int8, in the layouts of
    the kernels `table` chose for its shape (kernel_choice.py)."""

    def __init__(self, conv: Conv1D, table: KernelTable):
        super().__init__()
        q, scales = quantize_rows(conv.weight.detach().t())
        self.matmul = table.matmul("int8", (q.int_repr(), scales,
                                            conv.bias.detach().float().contiguous()))
        self.nbytes = q.numel() + conv.bias.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x)


class Int4Linear(nn.Module):
    """Drop-in for Conv1D: y = x @ W + b with W in groups of 4-bit weights, in the layouts of
    the kernels `table` chose for its shape."""

    def __init__(self, conv: Conv1D, table: KernelTable):
        super().__init__()
        q, scales = kernels.quantize_int4(conv.weight.detach().t().float())
        self.matmul = table.matmul("int4", (q, scales, conv.bias.detach().float().contiguous()))
        self.nbytes = q.numel() // 2 + scales.numel() * 2 + conv.bias.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x)


class Int8TiedHead(nn.Module):
    """Drop-in for TiedHead: int8 [V, D] rows with per-row scales serve both the logits
    and the embedding (rows dequantized on lookup, from our kernel's copy where it has one)."""

    def __init__(self, head: TiedHead, table: KernelTable):
        super().__init__()
        q, scales = quantize_rows(head.weight_t.detach().t())
        self.matmul = table.matmul("int8", (q.int_repr(), scales, None))
        if self.matmul.ours is None:
            self.register_buffer("rows", q.int_repr())
        self.register_buffer("scales", scales)
        self.nbytes = q.numel() + scales.nbytes
        self.n_embd = q.shape[1]

    def embed(self, tokens: Tensor) -> Tensor:
        if self.matmul.ours is None:
            rows = self.rows[tokens]
        else:
            rows = kernels.packed_int8_rows(self.matmul.ours.packed, tokens, self.n_embd)
        return rows.float() * self.scales[tokens].unsqueeze(-1)

    def bind_embed(self, out: Tensor, tokens: Tensor, positions: Tensor, wpe: Tensor
                   ) -> Callable[[], None]:
        """embed(tokens) + wpe's rows at `positions` into out, as one bound call
        (engine/decode_plan.py)."""
        rows = self.rows if self.matmul.ours is None else self.matmul.ours.packed
        return kernels.bind_embedding(out, tokens, positions, wpe, rows, len(self.scales),
                                      self.scales)

    def forward(self, hidden: Tensor, ln: nn.LayerNorm | None = None) -> Tensor:
        return self.matmul(hidden, ln=ln)
