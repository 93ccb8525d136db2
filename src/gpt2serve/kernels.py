"""Our own CPU kernels (_kernels.c, built by `pip install`), and when they run.

- `decode_attention` replaces, for a step's decode rows, what model.Block._attend does with
  torch ops (store, gather, scaled-dot-product attention): same arithmetic in fp32, up to
  summation order. It runs on CPU with an fp32 cache, or an fp16 one
  (`--kv_cache_dtype float16`) that it widens to fp32 as it reads.
- `int8_linear` replaces fbgemm's dynamic int8 matmul (quantize.py) for the few rows of a
  small decode batch, and multiplies the fp32 head's int8 copy (packing.HeadScreen).
- `linear_f32` replaces oneDNN's fp32 inner product (packing.py) for every fp32 linear layer
  and the LM head, on weights laid out by `pack_f32` in huge pages; or for some of a
  matrix's panels only (HeadScreen's candidates).

Where the module was not built (no compiler at install) or cannot run (not x86-64, CUDA,
fp16/bf16), the torch ops run. GPT2SERVE_C_KERNELS=0 turns them off, to compare
(bench/offline.py) or to rule them out.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import mmap
import os
import threading
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import hardware

try:
    from . import _kernels
except ImportError:  # built without a C compiler: torch ops only
    _kernels = None

ENABLED = _kernels is not None and os.environ.get("GPT2SERVE_C_KERNELS", "1") != "0"

# The instructions decode_attention and linear_f32 run: those of torch's own vectorized
# kernels, which ATEN_CPU_CAPABILITY caps (bench/offline.py --isa avx2 sets it): 2 AVX-512,
# 1 AVX2, 0 neither.
VECTOR_ISAS = {"AVX512": 2, "AVX2": 1}
VECTOR_ISA = VECTOR_ISAS.get(torch.backends.cpu.get_cpu_capability(), 0)


def _address(t: Tensor | None) -> int:
    """A tensor's address for _kernels, 0 for none."""
    return 0 if t is None else t.data_ptr()


def runs_nucleus(probs: Tensor) -> bool:
    """Whether our sampling kernels (nucleus_threshold, nucleus_draw, top_k_draw) serve rows
    like these (probabilities or logits)."""
    return ENABLED and probs.device.type == "cpu" and probs.dtype == torch.float32


def nucleus_threshold(probs: Tensor, top_p: Tensor) -> Tensor:
    """sampler.nucleus_threshold without sorting: per row of probabilities [S, V] (fp32 on
    CPU, runs_nucleus), the least likely token's probability that top-p keeps, by radix
    selection on the probabilities' bits; top_p [S], every token kept where it is 1 or
    more."""
    probs = probs.contiguous()
    top_p = top_p.to(torch.float64).contiguous()
    tau = torch.empty(probs.shape[0])
    _kernels.nucleus_threshold(probs.data_ptr(), top_p.data_ptr(), tau.data_ptr(),
                               *probs.shape)
    return tau


def nucleus_draw(logits: Tensor, temperature: Tensor, top_p: Tensor, u: Tensor) -> Tensor:
    """Per row of logits [S, V] (fp32 on CPU, runs_nucleus), the token that uniform u [S]
    draws from what top-p [S] keeps (every token where top_p is 1 or more) of its softmax at
    its temperature [S]: the softmax, nucleus_threshold, then sampler.draw over the kept
    tokens in the vocabulary's order, without the softmax's copies, a masked copy of the row
    or its cumsum -> int64 [S]."""
    logits = logits.contiguous()
    temperature, top_p, u = (t.to(torch.float64).contiguous() for t in (temperature, top_p, u))
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    _kernels.nucleus_draw(logits.data_ptr(), temperature.data_ptr(), top_p.data_ptr(),
                          u.data_ptr(), tokens.data_ptr(), *logits.shape, VECTOR_ISA)
    return tokens


def top_k_draw(logits: Tensor, ks: Tensor, temperature: Tensor, top_p: Tensor,
               u: Tensor) -> Tensor:
    """Per row of logits [S, V] (fp32 on CPU, runs_nucleus), the token that uniform u [S]
    draws from its ks [S] likeliest tokens and those tied with its k-th, at its temperature
    [S], top-p [S] applied within them (1 or more: none), likeliest first: the sampler's
    candidates and draw for top-k rows, without torch.topk -> int64 [S]."""
    logits = logits.contiguous()
    ks = ks.to(torch.long).contiguous()
    temperature, top_p, u = (t.to(torch.float64).contiguous() for t in (temperature, top_p, u))
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    _kernels.top_k_draw(logits.data_ptr(), ks.data_ptr(), temperature.data_ptr(),
                        top_p.data_ptr(), u.data_ptr(), tokens.data_ptr(), *logits.shape,
                        VECTOR_ISA)
    return tokens


# An fp16 cache is widened with F16C (every AVX2 CPU has it; checked all the same).
HALF_RUNS = VECTOR_ISA >= 1 and "f16c" in hardware.cpu_flags()


def runs_decode_attention(kv: Tensor, rows: torch.dtype) -> bool:
    """Whether decode_attention serves a cache like kv (one layer, or all of them) for a model
    whose queries, keys and values are `rows`: fp32 only, as the kernels read and write them
    (an fp16 model on CPU, its cache fp16, had its fp32 output written over half its size)."""
    return ENABLED and kv.device.type == "cpu" and rows == torch.float32 and (
        kv.dtype == torch.float32 or (kv.dtype == torch.float16 and HALF_RUNS))


def decode_attention(qkv: Tensor, kv: Tensor, blocks: Tensor, pos: Tensor,
                     scale: float, isa: int = VECTOR_ISA) -> Tensor:
    """Attention of one new token for each of N sequences -> [N, D].

    qkv [N, 3D]: their queries, keys and values (c_attn's output, rows contiguous); kv: one
    layer of the cache, [2, H, num_blocks, block_size, head_dim], contiguous, fp32 or fp16
    (runs_decode_attention; qkv fp32); blocks [N, width] int64 block tables; pos [N] int64, each
    token's position. The new keys and values are written at pos first; each query then
    attends to positions 0..pos of its sequence."""
    out = torch.empty(qkv.shape[0], kv.shape[1] * kv.shape[4], dtype=qkv.dtype)
    bind_decode_attention(qkv, kv, blocks, pos, scale, out, isa)()
    return out


def bind_decode_attention(qkv: Tensor, kv: Tensor, blocks: Tensor, pos: Tensor, scale: float,
                          out: Tensor, isa: int = VECTOR_ISA) -> Callable[[], None]:
    """decode_attention into `out` [N, D], as a call of no arguments on these tensors' memory:
    made once, it can be called for every step that refills them (engine/decode_plan.py).
    The caller keeps the tensors alive."""
    two, heads, num_blocks, block_size, head_dim = kv.shape
    _check_attention("decode_attention", qkv, kv, [blocks, pos], out)
    return _kernels.Call("decode_attention", qkv.data_ptr(), kv.data_ptr(), blocks.data_ptr(),
                         pos.data_ptr(), out.data_ptr(), qkv.shape[0], heads, head_dim,
                         num_blocks, block_size, blocks.shape[1], qkv.stride(0), scale, isa,
                         kv.dtype == torch.float16)


def together(calls: list[Callable[[], None]]) -> list[Callable[[], None]]:
    """The calls, in order, with each run of our bound calls (the bind_* functions' Calls)
    made one call, which runs them by one team of threads: one OpenMP parallel region, a
    barrier between two (_kernels.run; what that gains: _kernels.c, "bound calls"). Calls
    into torch's kernels (where kernel_choice.py chose them) stay as they are."""
    if _kernels is None:
        return calls
    grouped: list[Callable[[], None]] = []
    for ours, run in itertools.groupby(calls, lambda call: isinstance(call, _kernels.Call)):
        run = list(run)
        grouped += [functools.partial(_kernels.run, tuple(run))] if ours and len(run) > 1 else run
    return grouped


def _check_attention(kernel: str, qkv: Tensor, kv: Tensor, indices: list[Tensor],
                     out: Tensor | None = None) -> None:
    """The attention kernels' arguments, refused where the kernels would address them wrongly:
    rows not contiguous or not fp32 (an fp16 model's output was written over at twice its
    size), block tables and positions not int64, a cache neither fp32 nor fp16, which they
    write new keys and values into (runs_decode_attention says which serve)."""
    rows = [qkv] + ([] if out is None else [out])
    if qkv.stride(1) != 1 or not all(t.is_contiguous() for t in [kv, *indices, *rows[1:]]):
        raise ValueError(f"{kernel} takes contiguous rows")
    if any(t.dtype != torch.float32 for t in rows) or any(t.dtype != torch.int64
                                                          for t in indices):
        raise ValueError(f"{kernel} takes fp32 rows and int64 tables and positions")
    if kv.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"the attention kernels take an fp32 or fp16 cache, not {kv.dtype}")


def runs_prompt_attention(kv: Tensor, rows: torch.dtype) -> bool:
    """Whether prompt_attention serves a cache like kv: decode_attention's, with AVX-512 (its
    AVX2 form read prompts slower than torch's ops) and a head dim of 64 or 32."""
    return runs_decode_attention(kv, rows) and VECTOR_ISA == 2 and kv.shape[-1] in (64, 32)


def prompt_attention(qkv: Tensor, kv: Tensor, blocks: Tensor, start: Tensor,
                     lengths: Tensor | None, scale: float) -> Tensor:
    """Store N sequences' next T prompt rows each in the cache, then their attention ->
    [N * T, D].

    qkv [N * T, 3D]: their queries, keys and values, rows of a sequence together,
    right-padded to T; kv, blocks as decode_attention's; start [N] int64, each sequence's
    first new position; lengths [N] int64, its real rows (at most T), or None for all T; the
    block tables cover every real row's position. The real rows' keys and values go into the
    cache at their positions (the padding's do not), every sequence's before any row attends;
    row t attends to positions 0..start + t of its sequence (a padding row, to all of its
    real ones), in place through the block tables."""
    if VECTOR_ISA < 2:  # (its only form is AVX-512's)
        raise RuntimeError("prompt_attention needs AVX-512 (runs_prompt_attention)")
    two, heads, num_blocks, block_size, head_dim = kv.shape
    n = start.shape[0]
    indices = [blocks, start] + ([] if lengths is None else [lengths])
    _check_attention("prompt_attention", qkv, kv, indices)
    out = torch.empty(qkv.shape[0], heads * head_dim, dtype=qkv.dtype)
    _kernels.prompt_attention(qkv.data_ptr(), kv.data_ptr(), blocks.data_ptr(),
                              start.data_ptr(), 0 if lengths is None else lengths.data_ptr(),
                              out.data_ptr(), n, qkv.shape[0] // n, heads, head_dim,
                              num_blocks, block_size, blocks.shape[1], qkv.stride(0), scale,
                              kv.dtype == torch.float16)
    return out


HUGE_PAGE = 2 << 20


def _map_huge(nbytes: int) -> Tensor:
    """nbytes of an anonymous map, aligned to a huge page, advised MADV_HUGEPAGE."""
    # private: a shared anonymous map is shmem, which THP leaves alone by default
    mapped = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapped.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no THP in this kernel (EINVAL) or platform
        pass
    buffer = torch.frombuffer(mapped, dtype=torch.uint8)
    skip = -buffer.data_ptr() % HUGE_PAGE
    return buffer[skip:skip + nbytes]


def _whole_lines(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """A tensor's bytes, rounded up to whole cache lines (so the next one starts on one)."""
    return -(-math.prod(shape) * dtype.itemsize // 64) * 64


class _HugePages:
    """Memory for weights in transparent huge pages, handed out from 64 MiB anonymous maps
    advised MADV_HUGEPAGE (used where the kernel's THP setting is `madvise` or `always`).
    Streaming a matrix through 4 KiB pages stops the hardware prefetcher at every page
    boundary and misses the TLB every 64 cache lines. int8 decode gains most (its kernel does
    not prefetch), fp32 matmuls less, since linear_f32's own prefetch covers most page changes
    (docs/benchmarks.md, "Why it is fast"). A map is zeroed by the
    kernel as it is first written, and what no tensor took of it is never touched; the one
    being handed out stays referenced for the next tensor (at most 64 MiB)."""

    CHUNK = 64 << 20

    def __init__(self):
        self.lock = threading.Lock()
        self.chunk, self.used = None, 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = _whole_lines(shape, dtype)
        with self.lock:
            if self.chunk is None or self.used + nbytes > self.chunk.numel():
                self.chunk, self.used = _map_huge(max(self.CHUNK, nbytes)), 0
            start, self.used = self.used, self.used + nbytes
            return self.chunk[start:start + nbytes].view(dtype).view(shape)


class PageArena:
    """Huge pages for tensors that die together and are laid out again, as kernel_choice's
    copies are for one group of matrices after another: one map of `nbytes`, handed out from
    its start again after each `rewind`. A reused page is one the kernel has zeroed, and a
    VM's host backed, already: on a KVM guest, the first write of huge pages the guest had
    never used took 180 ms per 64 MiB against 10 ms for pages used before, and a first start
    laid out 494 MB of fp32 copies for each of two groups. Only written pages are backed, so
    `nbytes` may be generous; past it, the shared maps serve."""

    def __init__(self, nbytes: int):
        self.lock = threading.Lock()
        self.used = 0
        try:
            self.region = _map_huge(nbytes)
        except OSError:  # a reservation strict overcommit (vm.overcommit_memory=2) refused
            self.region = torch.empty(0, dtype=torch.uint8)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = _whole_lines(shape, dtype)
        with self.lock:
            start = self.used
            if start + nbytes > self.region.numel():
                return _huge_pages.empty(shape, dtype)
            self.used += nbytes
        return self.region[start:start + nbytes].view(dtype).view(shape)

    def rewind(self) -> None:
        """Hand the memory out again: every tensor it handed out must be dead."""
        with self.lock:
            self.used = 0

    def lend(self) -> None:
        """Weights this thread lays out (pack_*) take the arena's memory from now on."""
        _lending.set(self)


_lending: contextvars.ContextVar[PageArena | None] = contextvars.ContextVar(
    "gpt2serve_page_arena", default=None)
_huge_pages = _HugePages()


def _huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialized tensor in huge pages: the lent arena's on this thread, else shared."""
    return (_lending.get() or _huge_pages).empty(shape, dtype)


# The int8 kernel's instructions: VNNI exactly when fbgemm uses it, since that decides the
# weights' range (hardware.int8_weight_levels: 7 bits without VNNI, where vpmaddubsw's int16
# pair sums would otherwise saturate); AVX2 needed either way.
INT8_VNNI = hardware.int8_weight_levels() == 127
INT8_RUNS = ENABLED and hardware.fbgemm_isa() is not None
# AMX's tiles (int8_linear's form 2, int4_linear's isa 4), under torch's cap as our other
# AVX-512 code: the CPU has them and Linux lends them to this process.
AMX = (ENABLED and VECTOR_ISA == 2 and hardware.AMX_FLAGS <= hardware.cpu_flags()
       and _kernels.amx_ready())
PANEL = 16  # outputs per panel of pack_f32's and pack_int8's layouts (_kernels.c)


def pack_int8(q: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weights q [n, k] -> (the panels int8_linear reads, [ceil(n / 16), k4 / 4, 16, 4],
    each output's sum of weights [ceil(n / 16) * 16] int32), k4 = k rounded up to 4, zeros
    past n and k: a step of a panel is its 16 outputs' weights for four inputs, in huge
    pages."""
    n, k = q.shape
    n16, k4 = -(-n // PANEL) * PANEL, -(-k // 4) * 4
    padded = torch.zeros(n16, k4, dtype=torch.int8)
    padded[:n, :k] = q
    # numpy's int8 -> int32 row sums are far faster than torch's (docs/benchmarks.md):
    # start-up makes one per matrix
    sums = torch.from_numpy(padded.numpy().sum(1, dtype=np.int32))
    packed = _huge_empty((n16 // PANEL, k4 // 4, PANEL, 4), torch.int8)
    packed.copy_(padded.view(n16 // PANEL, PANEL, k4 // 4, 4).transpose(1, 2))
    return packed, sums


def packed_int8_rows(packed: Tensor, index: Tensor, k: int) -> Tensor:
    """Rows `index` of a pack_int8 matrix of k columns, as int8 [len(index), k]."""
    return packed[index // PANEL, :, index % PANEL].reshape(len(index), -1)[:, :k]


def bind_embedding(out: Tensor, tokens: Tensor, positions: Tensor, wpe: Tensor, rows: Tensor,
                   vocab: int, scales: Tensor | None = None) -> Callable[[], None]:
    """out [n, D] = the token embedding's row of each of tokens [n] (times its scale where
    `scales` is given: int8 rows) + wpe's row at its position (wpe's last past its end, as
    GPT._embed clamps), as a call of no arguments on these tensors' memory (see
    bind_decode_attention); a call raises ValueError for a token outside 0..vocab-1. `rows`:
    the embedding in its LM head's layout, pack_int8's [ceil(V / 16), D / 4, 16, 4] int8,
    pack_f32's [ceil(V / 16), D, 16] fp32, or plain [V, D] rows; out, wpe and scales fp32,
    tokens and positions int64, all contiguous."""
    n, d = out.shape
    if rows.dim() == 4:  # pack_int8: (r, i) at [r // 16, i // 4, r % 16, i % 4]
        strides = (rows.stride(0), rows.stride(2), rows.stride(1), rows.stride(3))
    elif rows.dim() == 3:  # pack_f32: at [r // 16, i, r % 16]
        strides = (rows.stride(0), rows.stride(2), 4 * rows.stride(1), rows.stride(1))
    else:  # plain rows: at [r, i]
        strides = (16 * rows.stride(0), rows.stride(0), 4 * rows.stride(1), rows.stride(1))
    fp32 = [out, wpe] + ([] if scales is None else [scales])
    if not (all(t.dtype == torch.float32 and t.is_contiguous() for t in fp32)
            and all(t.dtype == torch.long and t.is_contiguous() for t in (tokens, positions))
            and rows.dtype == (torch.int8 if scales is not None else torch.float32)):
        raise ValueError("embed takes contiguous fp32 rows, int64 tokens and positions, and "
                         "int8 rows with their scales")
    return functools.partial(_kernels.embed, out.data_ptr(), rows.data_ptr(), _address(scales),
                             wpe.data_ptr(), tokens.data_ptr(), positions.data_ptr(), n, d,
                             vocab, wpe.shape[0], *strides, scales is not None)


def int8_linear(x: Tensor, packed: Tensor, sums: Tensor, scales: Tensor, bias: Tensor | None,
                n: int, form: int = INT8_VNNI, x_error: Tensor | None = None,
                ln: nn.LayerNorm | None = None, gelu: bool = False,
                residual: Tensor | None = None, l1_rows: int = 0,
                normed: Tensor | None = None) -> Tensor:
    """x [m, k] fp32 @ W.T * scales + bias -> [m, n], W as pack_int8 made it; scales and
    bias fp32, scales padded like sums. Each row of x is quantized to u8 on its own (its
    scale and zero point). `form`: 2 AMX, 1 VNNI (True), 0 AVX2 (False), where W must hold
    7-bit values (|w| <= 63); all give the same results. `x_error`
    [m] fp32, if given, receives the Euclidean norm of each row of x minus its quantized
    form. `ln`, `gelu`, `residual` and `l1_rows` as in linear_f32; `normed` [m, k] fp32,
    if given with `ln`, receives x's layer-normed rows (the rows the product quantized)."""
    m, k = x.shape
    x = x.to(torch.float32).contiguous()
    residual = None if residual is None else residual.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    if x_error is not None and not (x_error.dtype == torch.float32
                                    and x_error.is_contiguous() and x_error.numel() == m):
        raise ValueError("x_error takes one contiguous fp32 value per row of x")
    if ln is not None and normed is None:
        normed = torch.empty(m, k, dtype=torch.float32)
    bind_int8_linear(x, packed, sums, scales, bias, y, form, x_error, ln, gelu, residual,
                     normed, l1_rows)()
    return y


def bind_int8_linear(x: Tensor, packed: Tensor, sums: Tensor, scales: Tensor,
                     bias: Tensor | None, y: Tensor, form: int = INT8_VNNI,
                     x_error: Tensor | None = None, ln: nn.LayerNorm | None = None,
                     gelu: bool = False, residual: Tensor | None = None,
                     normed: Tensor | None = None, l1_rows: int = 0) -> Callable[[], None]:
    """int8_linear into y [m, n], as a call of no arguments on these tensors' memory (see
    bind_decode_attention); all contiguous. `normed` [m, k]: room for x's layer-normed rows,
    needed with `ln`."""
    m, k = x.shape
    return _kernels.Call(
        "int8_linear", x.data_ptr(), packed.data_ptr(), scales.data_ptr(),
        sums.data_ptr(), _address(bias), y.data_ptr(), m, k, y.shape[1],
        packed.shape[1] * 4, int(form), l1_rows, _address(x_error),
        *_fused("int8_linear", ln, gelu, residual, normed))


def _fused(kernel: str, ln: nn.LayerNorm | None, gelu: bool, residual: Tensor | None,
           normed: Tensor | None) -> tuple:
    """The arguments both matmul kernels take for the ops around the product: the layer
    norm's weight, bias and eps, the room for its rows, the residual, GELU."""
    if ln is not None and normed is None:
        raise ValueError(f"{kernel} with a layer norm needs room for the normed rows")
    return (0 if ln is None else ln.weight.data_ptr(), 0 if ln is None else ln.bias.data_ptr(),
            0.0 if ln is None else ln.eps, _address(normed), _address(residual), gelu)


# The int4 kernel's instruction sets (int4_linear's `isa`): 4 AMX, 3 AVX-512 VNNI, 2 AVX-512
# (BW), 1 AVX2; every one up to the host's, under torch's cap (VECTOR_ISA), runs and is a
# candidate.
INT4_GROUP, INT4_BLOCK = 32, 64  # inputs a scale; inputs a block of a panel (576 bytes)
INT4_ISA = (0 if not ENABLED or VECTOR_ISA == 0 else 1 if VECTOR_ISA == 1
            else 2 if "avx512_vnni" not in hardware.cpu_flags() else 4 if AMX else 3)


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [n, k] fp32 -> (q [n, k] u8 in 0..15, scales [n, ceil(k / 32)] fp32 that fp16
    holds exactly), w = scales * (q - 8) per group of 32 inputs; each group's scale searched
    for the least squared error (_kernels.c, quantize_int4_group, which this mirrors where the
    C module does not run)."""
    n, k = w.shape
    groups = -(-k // INT4_GROUP)
    padded = torch.zeros(n, groups * INT4_GROUP)
    padded[:, :k] = w
    if INT4_ISA:
        q = torch.empty(n, groups * INT4_GROUP, dtype=torch.uint8)
        scales = torch.empty(n, groups)
        _kernels.quantize_int4(padded.data_ptr(), q.data_ptr(), scales.data_ptr(), n, groups)
        return q[:, :k].contiguous(), scales
    x = padded.view(n, groups, INT4_GROUP)
    largest = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    best, d = torch.full_like(largest, -1.0), torch.zeros_like(largest)
    for t in range(14):
        target = torch.tensor(-9.6, dtype=torch.float32) + torch.tensor(0.2) * t
        q = (x * torch.where(largest != 0, target / largest, 0)).round().clamp(-8, 7)
        wq, qq = (x * q).sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True)
        score = torch.where(qq > 0, wq * wq / qq.clamp(min=1e-30), -1.0)
        better = score > best
        best = torch.where(better, score, best)
        d = torch.where(better, wq / qq.clamp(min=1e-30), d)
    d = d.half().float()
    q = (x * torch.where(d != 0, 1 / d, 0)).round().clamp(-8, 7) + 8
    return q.to(torch.uint8).view(n, -1)[:, :k].contiguous(), d.view(n, groups)


def pack_int4(q: Tensor, scales: Tensor) -> Tensor:
    """quantize_int4's q [n, k] and scales -> the panels int4_linear reads, [ceil(n / 16),
    k64 / 64, 576] u8, k64 = k rounded up to 64, in huge pages; zero weights past n and k.
    A block: for each of its two groups, four vectors of 16 outputs x 4 inputs (inputs 4j..4j+3
    of the group in the low nibbles of vector j, 16+4j.. in the high ones), then the two
    groups' fp16 scales, 16 each."""
    n, k = q.shape
    n16, k64 = -(-n // PANEL) * PANEL, -(-k // INT4_BLOCK) * INT4_BLOCK
    padded = torch.full((n16, k64), 8, dtype=torch.uint8)
    padded[:n, :k] = q
    half_scales = torch.zeros(n16, k64 // INT4_GROUP, dtype=torch.float16)
    half_scales[:n, :scales.shape[1]] = scales
    panels, blocks = n16 // PANEL, k64 // INT4_BLOCK
    # (panel, output, block, group, low|high, j, input of 4) -> (panel, block, group, j,
    # output, input of 4, low|high)
    nibbles = padded.view(panels, PANEL, blocks, 2, 2, 4, 4).permute(0, 2, 3, 5, 1, 6, 4)
    packed = _huge_empty((panels, blocks, 576), torch.uint8)
    packed[..., :512] = (nibbles[..., 0] | nibbles[..., 1] << 4).reshape(panels, blocks, 512)
    packed[..., 512:] = (half_scales.view(panels, PANEL, blocks, 2).permute(0, 2, 3, 1)
                         .reshape(panels, blocks, 32).view(torch.uint8).reshape(panels, blocks, 64))
    return packed


def int4_linear(x: Tensor, packed: Tensor, bias: Tensor | None, n: int, isa: int = INT4_ISA,
                ln: nn.LayerNorm | None = None, gelu: bool = False,
                residual: Tensor | None = None, l1_rows: int = 0) -> Tensor:
    """x [m, k] fp32 @ W.T + bias -> [m, n], W as pack_int4 made it. Each group of 32 of a
    row of x is quantized to int8 on its own. `ln`, `gelu`, `residual` and `l1_rows` as in
    linear_f32."""
    m, k = x.shape
    x = x.to(torch.float32).contiguous()
    residual = None if residual is None else residual.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    normed = torch.empty(m, k, dtype=torch.float32) if ln is not None else None
    bind_int4_linear(x, packed, bias, y, isa, ln, gelu, residual, normed, l1_rows)()
    return y


def bind_int4_linear(x: Tensor, packed: Tensor, bias: Tensor | None, y: Tensor,
                     isa: int = INT4_ISA, ln: nn.LayerNorm | None = None, gelu: bool = False,
                     residual: Tensor | None = None, normed: Tensor | None = None,
                     l1_rows: int = 0) -> Callable[[], None]:
    """int4_linear into y [m, n], as a call of no arguments on these tensors' memory (see
    bind_decode_attention); all contiguous. `normed` [m, k]: room for x's layer-normed rows,
    needed with `ln`."""
    m, k = x.shape
    return _kernels.Call(
        "int4_linear", x.data_ptr(), packed.data_ptr(), _address(bias), y.data_ptr(),
        m, k, y.shape[1], packed.shape[1], isa, l1_rows,
        *_fused("int4_linear", ln, gelu, residual, normed))


# fp32 matmuls (packing.py): ours wherever AVX2 runs, oneDNN's elsewhere.
F32_RUNS = ENABLED and VECTOR_ISA >= 1


def pack_f32(w: Tensor) -> Tensor:
    """fp32 weights w [k, n] (Conv1D's [in, out]) -> the panels linear_f32 reads,
    [ceil(n / 16), k, 16], zeros past n, in huge pages."""
    k, n = w.shape
    full = n // PANEL
    panels = _huge_empty((-(-n // PANEL), k, PANEL), torch.float32)
    panels[:full] = w[:, :full * PANEL].reshape(k, full, PANEL).transpose(0, 1)
    if n % PANEL:
        panels[full].zero_()
        panels[full, :, :n % PANEL] = w[:, full * PANEL:]
    return panels


def f32_columns(panels: Tensor, index: Tensor) -> Tensor:
    """Columns `index` of a pack_f32 matrix, as rows [len(index), k] (the tied embedding)."""
    return panels[index // PANEL, :, index % PANEL]


def linear_f32(x: Tensor, panels: Tensor, bias: Tensor | None, n: int,
               isa: int = VECTOR_ISA, ln: nn.LayerNorm | None = None, gelu: bool = False,
               residual: Tensor | None = None, panel_ids: Tensor | None = None,
               l1_rows: int = 0) -> Tensor:
    """x [m, k] @ W + bias -> [m, n], W as pack_f32 laid it out; bias [n] fp32. Fused with
    it, the ops around a matmul in a GPT-2 layer: `ln` normalizes x's rows first, `gelu`
    (tanh form) is applied to the sum, and `residual` [m, n] is added last. `panel_ids`
    (int64): multiply these panels of W only, n = 16 per panel, in their order. Up to
    `l1_rows` rows, the next panel is prefetched into L1, else into L2 (the sums are the
    same; which streams faster depends on the CPU: matmul.OursF32)."""
    m, k = x.shape
    if panel_ids is not None:
        if n != PANEL * len(panel_ids) or not (
                panel_ids.dtype == torch.long and panel_ids.is_contiguous()
                and (not len(panel_ids) or 0 <= int(panel_ids.min()) <= int(panel_ids.max())
                     < panels.shape[0])):
            raise ValueError("panel_ids: contiguous int64 ids of W's panels, 16 outputs each")
    # (held here: the bound call has their addresses only)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    normed = torch.empty(m, k, dtype=torch.float32) if ln is not None else None
    bind_linear_f32(x, panels, bias, y, isa, ln, gelu, residual, normed, panel_ids, l1_rows)()
    return y


def bind_linear_f32(x: Tensor, panels: Tensor, bias: Tensor | None, y: Tensor,
                    isa: int = VECTOR_ISA, ln: nn.LayerNorm | None = None, gelu: bool = False,
                    residual: Tensor | None = None, normed: Tensor | None = None,
                    panel_ids: Tensor | None = None, l1_rows: int = 0) -> Callable[[], None]:
    """linear_f32 into y [m, n], as a call of no arguments on these tensors' memory (see
    bind_decode_attention); all contiguous. `normed` [m, k]: room for x's layer-normed rows,
    needed with `ln`."""
    m, k = x.shape
    return _kernels.Call(
        "linear_f32", x.data_ptr(), panels.data_ptr(), _address(bias), y.data_ptr(), m,
        k, y.shape[1], isa, l1_rows, *_fused("linear_f32", ln, gelu, residual, normed),
        _address(panel_ids))
