"""`--quantize int8`: int8 weights with per-channel scales, on CPU.

Every linear layer and the tied embedding / LM head are quantized once, at load. Matmuls run
through fbgemm's dynamic int8 kernel (`quantized::linear_dynamic`: activations are quantized
per call, per tensor; weights per output channel), the fastest of the CPU options compared in
docs/benchmarks.md. The embedding reads its rows from the same int8 matrix as the head, so
the weights are held once, in a quarter of the fp32 bytes.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import hardware
from .model import Conv1D, TiedHead


# Without VNNI, fbgemm multiplies u8 activations by s8 weights in pairs summed into int16
# (vpmaddubsw), which saturates when 2 * 255 * |w| > 32767. torch.ao avoids that by giving
# activations 7 bits (`reduce_range`); weights of 7 bits (|w| <= 63) avoid it too and keep
# more accuracy (top-1 agreement with fp32 in docs/benchmarks.md, "int8 quality"). VNNI is
# what fbgemm will use, not what the CPU has: FBGEMM_ENABLE_INSTRUCTIONS=AVX2 takes it away on
# a VNNI host, and AVX-VNNI without AVX-512 has no fbgemm kernel (hardware.int8_weight_levels).
WEIGHT_LEVELS = hardware.int8_weight_levels()
REDUCE_RANGE = False


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: w [out, in] -> (qweight, scales [out])."""
    w = w.float()
    # the largest |w| of each row, without an |w| copy of the matrix (loading's peak memory)
    scales = (torch.linalg.vector_norm(w, ord=float("inf"), dim=1) / WEIGHT_LEVELS
              ).clamp(min=1e-12)
    with warnings.catch_warnings():
        # Quantized tensor types are deprecated in favour of torchao, but fbgemm's packed
        # kernels, still the fastest int8 path on CPU here, take nothing else (torch 2.13).
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scales.double(),
                                       torch.zeros(w.shape[0], dtype=torch.long),
                                       axis=0, dtype=torch.qint8)
    return q, scales


class Int8Linear(nn.Module):
    """Drop-in for Conv1D: y = x @ W + b with W held as packed per-channel int8."""

    def __init__(self, conv: Conv1D):
        super().__init__()
        q, _ = quantize_rows(conv.weight.detach().t())
        self._packed = torch.ops.quantized.linear_prepack(q, conv.bias.detach().float())
        self.nbytes = q.numel() + conv.bias.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, REDUCE_RANGE)


class Int8TiedHead(nn.Module):
    """Drop-in for TiedHead: int8 [V, D] rows with per-row scales serve both the logits
    (fbgemm) and the embedding (rows dequantized on lookup)."""

    def __init__(self, head: TiedHead):
        super().__init__()
        q, scales = quantize_rows(head.weight_t.detach().t())
        self._packed = torch.ops.quantized.linear_prepack(q, None)
        self.register_buffer("rows", q.int_repr())
        self.register_buffer("scales", scales)
        self.nbytes = self.rows.nbytes + scales.nbytes

    def embed(self, tokens: Tensor) -> Tensor:
        return self.rows[tokens].float() * self.scales[tokens].unsqueeze(-1)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(hidden, self._packed, REDUCE_RANGE)
