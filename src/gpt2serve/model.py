"""The GPT-2 network: config, blocks, a preallocated KV cache, prefill and decode.

One file, nanoGPT style. Parameter names and layouts are Hugging Face's (`Conv1D` weights are
[in, out]), so a checkpoint maps onto this module by dropping the `transformer.` prefix
(see `checkpoint.py`). Matmuls run as `addmm(bias, x, W[in, out])`, which on CPU is the fast
GEMV layout; the tied embedding / LM head is stored once, as a contiguous [D, V] matrix, for
the same reason (`TiedHead`).

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
    """Keys and values for `slots` sequences of up to `max_len` tokens, allocated once."""

    def __init__(self, config: GPTConfig, slots: int, max_len: int, dtype, device):
        shape = (config.n_layer, slots, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy one sequence's entries to another slot (used to keep running slots packed)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 linear layer: weight [in, out], y = x @ W + b."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], -1)


class Block(nn.Module):
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
        self.n_head, self.layer_idx = config.n_head, layer_idx
        scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(self, x: Tensor, cache: KVCache, slots: slice, pos: Tensor | None,
                mask: Tensor | None) -> Tensor:
        """x: [B, T, D]. Prefill (pos None): T new tokens at positions 0..T-1 of one slot.
        Decode: T == 1, the token of row b goes to position pos[b] of slot b."""
        B, T, D = x.shape
        H = self.n_head
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
        if pos is None:
            ck[slots, :, :T] = k
            cv[slots, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            rows = torch.arange(B, device=x.device)
            ck[rows, :, pos] = k[:, :, 0]
            cv[rows, :, pos] = v[:, :, 0]
            L = mask.shape[-1]
            y = F.scaled_dot_product_attention(
                q, ck[:B, :, :L], cv[:B, :, :L], attn_mask=mask, scale=self.scale)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, D))
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

    def _run(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: slice,
             pos: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.head.embed(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x, cache, slots, pos, mask)
        return self.ln_f(x)

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
        positions = torch.arange(T, device=tokens.device).expand(N, T)
        hidden = self._run(tokens, positions, cache, slice(slot, slot + N), None, None)
        if not all_logits:
            last = (lengths - 1 if lengths is not None
                    else torch.full((N,), T - 1, device=tokens.device))
            hidden = hidden[torch.arange(N, device=tokens.device), last]
        logits = self.logits(hidden)
        return logits[0] if single else logits

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, pos: Tensor, cache: KVCache) -> Tensor:
        """One token for each of slots 0..B-1: tokens [B] at positions pos [B] -> logits [B, V]."""
        L = int(pos.max()) + 1
        mask = (torch.arange(L, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
        hidden = self._run(tokens[:, None], pos[:, None], cache, slice(None), pos, mask)
        return self.logits(hidden[:, 0])
