"""The GPT-2 network: config, blocks, a preallocated KV cache, prefill and decode.

One file, nanoGPT style. Parameter names and layouts are Hugging Face's (`Conv1D` weights are
[in, out]), so a checkpoint maps onto this module by dropping the `transformer.` prefix
(see `checkpoint.py`). Matmuls run as `addmm(bias, x, W[in, out])` on 2-D activations
[tokens, features], which on CPU is the fast GEMV layout; the tied embedding / LM head is
stored once, as a contiguous [D, V] matrix, for the same reason (`TiedHead`). packing.py and
quantize.py swap in faster kernels for the same products.

The cache holds `slots` sequences. The engine keeps running sequences packed in slots
0..B-1, so decode attends over a plain slice of the cache with a per-row length mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


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
    """Keys and values for `slots` sequences of up to `max_len` tokens, allocated once.

    Layout [layer, slot, key|value, head, position, head_dim]: attention reads each head's
    keys as one contiguous run (a token-major layout read them markedly slower; figures in
    docs/benchmarks.md), and a decode step stores all new keys and values of a layer with one
    `index_copy_`."""

    def __init__(self, config: GPTConfig, slots: int, max_len: int, dtype, device):
        shape = (config.n_layer, slots, 2, config.n_head, max_len, config.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy one sequence's entries to another slot (used to keep running slots packed)."""
        self.kv[:, dst, ..., :length, :] = self.kv[:, src, ..., :length, :]

    def rows(self, pos: Tensor) -> Tensor:
        """Where slots 0..B-1 store the key and value of each head for a token at pos [B]:
        row numbers in one layer's cache viewed as [slots * 2 * heads * max_len, head_dim]."""
        B, per_slot = pos.shape[0], 2 * self.kv.shape[3]
        first = torch.arange(B * per_slot, device=pos.device).view(B, per_slot) * self.max_len
        return (first + pos[:, None]).view(-1)


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

    def prefill(self, x: Tensor, kv: Tensor, slots: slice, N: int, T: int) -> Tensor:
        """x: [N * T, D], N prompts of T tokens at positions 0..T-1, cached in `slots`."""
        D, H = x.shape[1], self.n_head
        qkv = self.attn.c_attn(self.ln_1(x)).view(N, T, 3, H, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, H, T, head_dim]
        kv[slots, ..., :T, :] = qkv[:, :, 1:].permute(0, 2, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self._rest(x, y.transpose(1, 2).reshape(N * T, D))

    def decode(self, x: Tensor, kv: Tensor, rows: Tensor, L: int,
               mask: Tensor | None) -> Tensor:
        """x: [B, D], one token of each of slots 0..B-1, stored at `rows` (KVCache.rows); each
        attends to positions 0..L-1 of its slot where `mask` [B, 1, 1, L] is true (all of
        them without a mask)."""
        B, D = x.shape
        H, hd = self.n_head, self.head_dim
        qkv = self.attn.c_attn(self.ln_1(x))
        kv.view(-1, hd).index_copy_(0, rows, qkv[:, D:].reshape(-1, hd))
        k, v = kv[:B, ..., :L, :].unbind(1)
        y = F.scaled_dot_product_attention(qkv[:, :D].view(B, H, 1, hd), k, v,
                                           attn_mask=mask, scale=self.scale)
        return self._rest(x, y.reshape(B, D))

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

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden @ self.weight_t


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.head = TiedHead(config.n_embd, config.vocab_size)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden).float()

    def swap_matmuls(self, linear: Callable[[Conv1D], nn.Module],
                     head: Callable[[TiedHead], nn.Module]) -> None:
        """Replace every Conv1D and the tied head by other implementations of the same
        product (packing.py, quantize.py)."""
        for block in self.h:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"),
                                 (block.mlp, "c_fc"), (block.mlp, "c_proj")):
                setattr(parent, name, linear(getattr(parent, name)))
        self.head = head(self.head)

    def weight_bytes(self) -> int:
        """Bytes of weights a decode step streams. Layers swapped in by packing.py and
        quantize.py hold theirs outside parameters and report them as `nbytes`."""
        return (sum(p.nbytes for p in self.parameters())
                + sum(getattr(m, "nbytes", 0) for m in self.modules()))

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, cache: KVCache, slot: int, lengths: Tensor | None = None,
                all_logits: bool = False) -> Tensor:
        """Run N prompts, right-padded to tokens [N, T] (or one, [T]), into slots slot..slot+N-1.

        Right padding needs no mask: under causal attention a prompt's tokens never see the
        padding after them, and the garbage it leaves in the cache lies past the prompt, where
        decode overwrites it before it is ever attended to. Returns the logits at each prompt's
        last token, [N, V] ([V] for one prompt), or at every position [N, T, V] if asked."""
        single = tokens.dim() == 1
        tokens = tokens[None] if single else tokens
        N, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).repeat(N)
        x = self.head.embed(tokens.reshape(-1)) + self.wpe(positions)
        slots = slice(slot, slot + N)
        for block, kv in zip(self.h, cache.kv):
            x = block.prefill(x, kv, slots, N, T)
        hidden = self.ln_f(x).view(N, T, -1)
        if all_logits:
            logits = self.logits(hidden.view(N * T, -1)).view(N, T, -1)
        else:
            last = (lengths - 1 if lengths is not None
                    else torch.full((N,), T - 1, device=tokens.device))
            logits = self.logits(hidden[torch.arange(N, device=tokens.device), last])
        return logits[0] if single else logits

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, pos: Tensor, cache: KVCache,
                    between_layers: Callable[[], None] | None = None) -> Tensor:
        """One token for each of slots 0..B-1: tokens [B] at positions pos [B] -> logits [B, V].

        `between_layers`, if given, runs after each layer: it may use the model on slots past
        B-1 (the engine prefills newly arrived prompts there, so that they wait for one layer
        of the step in flight rather than all of it)."""
        B = tokens.shape[0]
        rows = cache.rows(pos)
        L = int(pos.max()) + 1
        mask = None  # a lone sequence attends to all L positions
        if B > 1:
            mask = (torch.arange(L, device=pos.device) <= pos[:, None])[:, None, None, :]
        x = self.head.embed(tokens) + self.wpe(pos)
        for block, kv in zip(self.h, cache.kv):
            x = block.decode(x, kv, rows, L, mask)
            if between_layers is not None:
                between_layers()
        return self.logits(self.ln_f(x))
