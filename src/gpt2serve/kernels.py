"""Our own CPU kernels (_kernels.c, built by `pip install`), and when they run.

- `decode_attention` replaces, for a step's decode rows, what model.Block._attend does with
  torch ops (store, gather, scaled-dot-product attention): same arithmetic in fp32, up to
  summation order. It runs on CPU with an fp32 cache.
- `int8_linear` replaces fbgemm's dynamic int8 matmul (quantize.py) for the few rows of a
  small decode batch.

Where the module was not built (no compiler at install) or cannot run (not x86-64, CUDA,
fp16/bf16), the torch ops run. GPT2SERVE_C_KERNELS=0 turns them off, to compare
(bench/offline.py) or to rule them out.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from . import hardware

try:
    from . import _kernels
except ImportError:  # built without a C compiler: torch ops only
    _kernels = None

ENABLED = _kernels is not None and os.environ.get("GPT2SERVE_C_KERNELS", "1") != "0"

# The instructions decode_attention runs: those of torch's own vectorized kernels, which
# ATEN_CPU_CAPABILITY caps (bench/offline.py --isa avx2 sets it): 2 AVX-512, 1 AVX2, 0 neither.
ATTENTION_ISAS = {"AVX512": 2, "AVX2": 1}
ATTENTION_ISA = ATTENTION_ISAS.get(torch.backends.cpu.get_cpu_capability(), 0)


def runs_decode_attention(kv: Tensor) -> bool:
    """Whether decode_attention serves a cache like kv (one layer, or all of them)."""
    return ENABLED and kv.device.type == "cpu" and kv.dtype == torch.float32


def decode_attention(qkv: Tensor, kv: Tensor, blocks: Tensor, pos: Tensor,
                     scale: float, isa: int = ATTENTION_ISA) -> Tensor:
    """Attention of one new token for each of N sequences -> [N, D].

    qkv [N, 3D]: their queries, keys and values (c_attn's output, rows contiguous); kv: one
    layer of the cache, [2, H, num_blocks, block_size, head_dim], contiguous; blocks [N, width]
    int64 block tables; pos [N] int64, each token's position. The new keys and values are
    written at pos first; each query then attends to positions 0..pos of its sequence."""
    two, heads, num_blocks, block_size, head_dim = kv.shape
    n = qkv.shape[0]
    if qkv.stride(1) != 1 or not (kv.is_contiguous() and blocks.is_contiguous()
                                  and pos.is_contiguous()):
        raise ValueError("decode_attention takes contiguous rows")
    out = torch.empty(n, heads * head_dim, dtype=qkv.dtype)
    _kernels.decode_attention(qkv.data_ptr(), kv.data_ptr(), blocks.data_ptr(), pos.data_ptr(),
                              out.data_ptr(), n, heads, head_dim, num_blocks, block_size,
                              blocks.shape[1], qkv.stride(0), scale, isa)
    return out


# int8 matmuls (quantize.py): ours at up to this many rows, fbgemm's beyond. Ours streams the
# weights at the machine's read bandwidth where a decode step at batch 1 is bound by it, but its
# cost grows with every row, and fbgemm's GEMM blocking wins from about 6 rows on
# (docs/benchmarks.md, "Our own CPU kernels"; bench/kernels.py).
INT8_MAX_ROWS = 4
# The int8 kernel's instructions: VNNI exactly when fbgemm uses it, since that decides the
# weights' range (hardware.int8_weight_levels: 7 bits without VNNI, where vpmaddubsw's int16
# pair sums would otherwise saturate); AVX2 needed either way.
INT8_VNNI = hardware.int8_weight_levels() == 127
INT8_RUNS = ENABLED and hardware.fbgemm_isa() is not None


def pack_int8(q: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weights q [n, k] -> (the layout int8_linear reads, each row's sum [n4] int32).
    Rows are padded with zeros to a multiple of 32 bytes and of 4 rows, and groups of four
    rows are interleaved 32 bytes at a time, so that each thread reads one sequential stream
    (four separate rows of a few hundred bytes each were too short for the hardware
    prefetcher: 17 GB/s against 34 interleaved)."""
    n, k = q.shape
    n4, kp = -(-n // 4) * 4, -(-k // 32) * 32
    padded = torch.zeros(n4, kp, dtype=torch.int8)
    padded[:n, :k] = q
    # numpy's int8 -> int32 row sums run 15x faster than torch's here (1.6 against 25 ms for
    # a 6400 x 1600 matrix): start-up makes one per matrix
    sums = torch.from_numpy(padded.numpy().sum(1, dtype=np.int32))
    return padded.view(n4 // 4, 4, kp // 32, 32).transpose(1, 2).contiguous(), sums


def packed_int8_rows(packed: Tensor, index: Tensor, k: int) -> Tensor:
    """Rows `index` of a pack_int8 matrix of k columns, as int8 [len(index), k]."""
    groups, chunks, four, width = packed.shape
    return packed[index // 4, :, index % 4].reshape(-1, chunks * width)[:, :k]


def int8_linear(x: Tensor, packed: Tensor, sums: Tensor, scales: Tensor, bias: Tensor | None,
                n: int, vnni: bool = INT8_VNNI) -> Tensor:
    """x [m, k] fp32 @ W.T * scales + bias -> [m, n], W as pack_int8 made it; scales [n4] and
    bias [n] fp32. Each row of x is quantized to u8 on its own (its scale and zero point).
    Without `vnni`, W must hold 7-bit values (|w| <= 63)."""
    m, k = x.shape
    x = x.to(torch.float32).contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    _kernels.int8_linear(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), sums.data_ptr(),
                         0 if bias is None else bias.data_ptr(), y.data_ptr(), m, k, n,
                         packed.shape[1] * packed.shape[3], vnni)
    return y
