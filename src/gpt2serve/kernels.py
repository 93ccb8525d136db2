"""Our own CPU kernels (_kernels.c, built by `pip install`), and when they run.

`decode_attention` replaces, for a step's decode rows, what model.Block._attend does with torch
ops (store, gather, scaled-dot-product attention): same arithmetic in fp32, up to summation
order. It runs on CPU with an fp32 cache when the module was built; everywhere else (CUDA,
fp16/bf16, no compiler at install) the torch ops run. GPT2SERVE_C_KERNELS=0 turns it off, to
compare the two (bench/offline.py) or to rule it out.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from . import _kernels
except ImportError:  # built without a C compiler: torch ops only
    _kernels = None

ENABLED = _kernels is not None and os.environ.get("GPT2SERVE_C_KERNELS", "1") != "0"


def runs_decode_attention(kv: Tensor) -> bool:
    """Whether decode_attention serves a cache like kv (one layer, or all of them)."""
    return ENABLED and kv.device.type == "cpu" and kv.dtype == torch.float32


def decode_attention(qkv: Tensor, kv: Tensor, blocks: Tensor, pos: Tensor,
                     scale: float) -> Tensor:
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
                              blocks.shape[1], qkv.stride(0), scale)
    return out
