"""Fast FP32 on CPU: the linear layers and the LM head, their weights laid out once, at load,
for the kernel that multiplies them.

A decode step at small batch is a chain of matrix-vector products that must stream every
weight from memory. `addmm` with HF's [in, out] layout streams them well below the
machine's read bandwidth. Our kernel (kernels.linear_f32) reads panels of 16 outputs from
huge pages, one sequential stream per thread; oneDNN's inner product reads weights it
reordered. Which serves each number of rows is measured at load (kernel_choice.py; matmul.py
holds the candidates). Results are the same fp32 arithmetic, up to summation order. Greedy and top-k decode
steps skip the LM head's fp32 logits that cannot be among the k largest (HeadScreen).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from . import hardware, kernels, quantize
from .kernel_choice import KernelTable
from .matmul import Matmul, OursInt8
from .model import GPT, Block, Conv1D, TiedHead


def available() -> bool:
    return kernels.F32_RUNS or torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """Drop-in for Conv1D (y = x @ W + b) with W laid out for the kernels `table` chose for
    its shape (kernel_choice.py)."""

    def __init__(self, conv: Conv1D, table: KernelTable):
        super().__init__()
        weight = conv.weight.detach()
        self.matmul = table.matmul("fp32", (weight, conv.bias.detach().clone()))
        self.nbytes = weight.nbytes + conv.bias.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x)


class PackedHead(nn.Module):
    """Drop-in for TiedHead: the logits from the laid-out matrix, which also gives the
    embedding's rows where it is ours; other layouts cannot be indexed by token, so without
    ours the embedding keeps a plain [V, D] copy. Where our kernels run, greedy and top-k
    decode steps need not compute every logit (HeadScreen.of)."""

    def __init__(self, head: TiedHead, table: KernelTable):
        super().__init__()
        weight = head.weight_t.detach()
        self.matmul = table.matmul("fp32", (weight, None))
        self.rows = None if self.matmul.ours is not None else weight.t().contiguous()
        self.nbytes, self.vocab_size = weight.nbytes, weight.shape[1]
        self.finite = bool(torch.isfinite(weight).all())

    def embed(self, tokens: Tensor) -> Tensor:
        if self.rows is None:
            return kernels.f32_columns(self.matmul.ours.panels, tokens)
        return nn.functional.embedding(tokens, self.rows)

    def bind_embed(self, out: Tensor, tokens: Tensor, positions: Tensor, wpe: Tensor
                   ) -> Callable[[], None]:
        """embed(tokens) + wpe's rows at `positions` into out, as one bound call
        (engine/decode_plan.py)."""
        rows = self.rows if self.rows is not None else self.matmul.ours.panels
        return kernels.bind_embedding(out, tokens, positions, wpe, rows, self.vocab_size)

    def forward(self, hidden: Tensor, ln: nn.LayerNorm | None = None) -> Tensor:
        return self.matmul(hidden, ln=ln)


class HeadScreen:
    """Each row's k largest fp32 logits, exactly, from an int8 copy of the LM head and the fp32
    logits of a few candidates: what greedy decoding (k = 1) and top-k sampling read. At batch
    1 the tied head is a large share of the weights a GPT-2 decode step streams, and its int8
    copy a quarter of the head.

    The int8 logit s_i of head row w_i bounds the fp32 one f_i: with h the hidden state and h'
    and w_i' what their int8 forms stand for,
        |f_i - s_i| <= |(h - h')·w_i| + |h'·(w_i - w_i')| + rounding
                    <= |h - h'| |w_i| + (|h| + |h - h'|) |w_i - w_i'| + rounding   (Cauchy-Schwarz)
    where |h - h'| comes from the int8 kernel, |w_i| and |w_i - w_i'| are measured at load,
    and rounding is the fp32 dot product's (at most D·u·|h||w_i| over D inputs, u = 2^-24)
    and s_i's own (a few u·|s_i|). Every token whose upper bound reaches the k-th largest
    lower bound is a candidate, and every token whose logit is among the k largest (or equals
    the k-th) is one. The candidates' panels get their fp32 logits from the kernel and row
    count the full head uses, so they are the full head's to the bit; the other logits are
    -inf. The first largest logit is then the full row's, and so is each of the k largest
    values (where two of them tie exactly, the order torch.topk gives them is its own either
    way). For greedy decoding the bound leaves one to a few candidates; top-k 50 leaves
    hundreds (docs/benchmarks.md). Where more than half the panels would be recomputed (the
    int8 copy and those cost three quarters of the head), the full head runs instead
    (`logits` returns None). After REST_AFTER such declines in a row for the same k (flat
    logits, a large k), the screen sits out REST_STEPS steps of that k (`promising`), then
    tries again. Whether a step of more than a few rows gains by the screen at all is measured
    on the steps themselves (`choice`, a ScreenChoice)."""

    U = 2.0 ** -24  # fp32's unit roundoff
    REST_AFTER, REST_STEPS = 4, 256

    @staticmethod
    def nbytes_for(n: int, d: int) -> int:
        """The `nbytes` of a screen of an n x d head, before one is built: its int8 rows and
        their fp32 scales in panels of kernels.PANEL (kernels.pack_int8), and each row's norm
        and error in fp32."""
        rows = -(-n // kernels.PANEL) * kernels.PANEL
        return rows * (-(-d // 4) * 4 + 4) + 8 * n

    @classmethod
    def of(cls, head: nn.Module) -> HeadScreen | None:
        """A screen of a PackedHead in our kernel's panels, where our int8 kernel runs and the
        head is finite (the bound needs finite norms); None elsewhere."""
        if (not isinstance(head, PackedHead) or head.matmul.ours is None
                or not kernels.INT8_RUNS or not head.finite):
            return None
        return cls(head.matmul)

    def __init__(self, matmul: Matmul):
        self.matmul = matmul  # the head's: its kernel for m rows is the one to repeat
        panels, n = self.panels, self.n = matmul.ours.panels, matmul.ours.n
        d = panels.shape[1]
        q = torch.empty(n, d, dtype=torch.int8)
        scales, self.norms, self.errors = torch.empty(n), torch.empty(n), torch.empty(n)

        def screen(start: int) -> None:
            chunk = slice(start, min(start + step, n))
            w = kernels.f32_columns(panels, torch.arange(chunk.start, chunk.stop))
            qw, scales[chunk] = quantize.quantize_rows(w)
            q[chunk] = qw.int_repr()
            # (in fp32: their relative error, a few u, is well inside the bound's 1.001)
            self.norms[chunk] = torch.linalg.vector_norm(w, dim=1)
            w -= q[chunk] * scales[chunk, None]
            self.errors[chunk] = torch.linalg.vector_norm(w, dim=1)

        # Rows of 4 MiB at a time (loading's peak memory), on every core, each worker on one
        # intra-op thread as checkpoint.build_model's: a model loaded while others serve is
        # ready the sooner.
        step = max(1, (1 << 20) // d)
        with ThreadPoolExecutor(hardware.default_threads(), initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            list(pool.map(screen, range(0, n, step)))
        self.int8 = OursInt8(q, scales, None)
        self.gamma = d * self.U / (1 - d * self.U)  # the fp32 dot product's relative error
        self.max_panels = panels.shape[0] // 2
        self.nbytes = self.int8.packed.nbytes + 4 * self.int8.scales.numel() + 8 * n
        # by a step's largest k: declines in a row, and steps left to sit out
        self._declines: dict[int, int] = {}
        self._resting: dict[int, int] = {}
        self.choice = ScreenChoice()

    def serves(self, m: int) -> bool:
        """Whether the head multiplies m rows with our fp32 kernel, whose sums the screen's
        exact logits repeat (another kernel's, or our other ISA's tiles, differ in the last
        bits, and a screened step would not give what a declined one does)."""
        return self.matmul.kernel(m)[0] is self.matmul.ours

    def promising(self, ks: list[int]) -> bool:
        """Whether to screen a step whose rows want their ks largest logits: not while the
        screen rests after declining steps of the same largest k."""
        k = max(ks)
        if self._resting.get(k):
            self._resting[k] -= 1
            return False
        return True

    def logits(self, hidden: Tensor, ks: list[int], ln: nn.LayerNorm | None = None
               ) -> Tensor | None:
        """Logits [m, V] for hidden states [m, D] read through the layer norm `ln` as the
        head reads them (PackedHead.forward), exact wherever they can be among row i's ks[i]
        largest and -inf where they cannot; None where the screen leaves too many
        candidates, where it does not serve m rows, or where a row is not finite."""
        m = hidden.shape[0]
        if not (self.serves(m) and bool(torch.isfinite(hidden).all())):
            return None
        hidden, error = hidden.contiguous(), torch.empty(m)
        # h: the rows the head multiplies, normed by the int8 kernel as the head's own
        # kernel norms them (the same C code), so that the exact logits below are the head's
        h = hidden if ln is None else torch.empty_like(hidden)
        s = self.int8(hidden, x_error=error, ln=ln, normed=None if ln is None else h)
        if ln is not None and not bool(torch.isfinite(h).all()):  # (a layer norm's weights)
            return None
        norm = torch.linalg.vector_norm(h, dim=1)
        # fp32 rounding of the bound itself and of s +- bound: the 1.001 and 8u|s| cover it
        bound = torch.outer(error + self.gamma * norm, self.norms)
        bound.addcmul_((norm + error)[:, None], self.errors[None]).add_(s.abs(), alpha=8 * self.U)
        bound.mul_(1.001)
        low, k = s - bound, max(ks)
        if k == 1:
            floor = low.amax(1, keepdim=True)
        else:  # each row's k-th largest lower bound
            floor = low.topk(k).values.gather(1, torch.tensor(ks)[:, None] - 1)
        panels = torch.unique((s + bound >= floor).nonzero()[:, 1] // kernels.PANEL)
        if len(panels) > self.max_panels:
            self._declines[k] = self._declines.get(k, 0) + 1
            if self._declines[k] == self.REST_AFTER:
                self._declines[k], self._resting[k] = 0, self.REST_STEPS
            return None
        self._declines[k] = 0
        isa, l1_rows = self.matmul.kernel(m)[1]  # (serves: ours, as the head runs m rows)
        exact = kernels.linear_f32(h, self.panels, None, len(panels) * kernels.PANEL, isa=isa,
                                   l1_rows=l1_rows, panel_ids=panels)
        ids = (panels[:, None] * kernels.PANEL + torch.arange(kernels.PANEL)).flatten()
        real = ids < self.n  # (the last panel's padding is not a token)
        logits = torch.full((m, self.n), -math.inf)
        logits[:, ids[real]] = exact[:, real]
        return logits


class ScreenChoice:
    """Whether a step of m rows that want up to k largest logits reads the head's screen or
    the whole head, measured on the steps themselves (k rounded up to a power of two, so that
    requests' top_k values cannot grow its tables). Up to ALWAYS_ROWS rows the screen has paid
    on every machine measured (greedy batch 1: 1.22-1.24x tok/s). Beyond, it depends on the
    machine and on k: at batch 8 an EPYC ran level (0.996x), and an Emerald Rapids Xeon's
    fp32 model 1.10-1.18x faster with greedy rows but 0.93-1.03x with top-k 50
    (docs/benchmarks.md). So for each (m, k) the first WARMUP steps each way alternate, then
    the way whose last WINDOW steps took less time at the median is taken, and every
    EXPLORE-th step goes the other way, so that a change in the machine or in the text is
    seen. Both ways give the same tokens (the screen's logits are exact where they count), so
    the choice costs time only: at most one step in EXPLORE the slower way. The model's own
    traffic decides rather than logits made up at load, since how many candidates the screen
    leaves depends on how peaked the model's logits are."""

    ALWAYS_ROWS = 4
    WARMUP, WINDOW, EXPLORE = 8, 16, 64

    def __init__(self) -> None:
        self._seconds: dict[tuple[int, int, bool], deque[float]] = {}
        self._steps: dict[tuple[int, int], int] = {}

    def screens(self, m: int, k: int) -> bool:
        if m <= self.ALWAYS_ROWS:
            return True
        k = _power_of_two(k)
        step = self._steps.get((m, k), 0)
        self._steps[m, k] = step + 1
        screened, full = (self._seconds.get((m, k, way), ()) for way in (True, False))
        if len(screened) < self.WARMUP or len(full) < self.WARMUP:
            return step % 2 == 0
        faster = statistics.median(screened) <= statistics.median(full)
        return faster != (step % self.EXPLORE == self.EXPLORE - 1)

    def observe(self, m: int, k: int, screened: bool, seconds: float) -> None:
        """A step's seconds from its hidden states to its logits: the screen's way (whether
        it decided or declined), or the whole head's."""
        if m > self.ALWAYS_ROWS:
            key = (m, _power_of_two(k), screened)
            self._seconds.setdefault(key, deque(maxlen=self.WINDOW)).append(seconds)


def _power_of_two(k: int) -> int:
    """k rounded up to a power of two."""
    return 1 << (k - 1).bit_length()


# The activations that are GELU's tanh form, which kernels.linear_f32 applies itself.
TANH_GELU = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


class FusedBlock:
    """A Block's small ops done inside the calls of its matmuls to our kernel: each layer
    norm as its matmul reads its input, GELU and the residual adds as their matmul writes
    its output. Five calls a layer instead of a dozen ops, whose dispatch and Python were a
    measurable share of a batch-1 decode step (docs/benchmarks.md, "Why it is fast")."""

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
    """Give every block a FusedBlock where its matmuls are laid out for their kernels (fp32
    or int8): the kernels that cannot do a layer's small ops themselves get torch ops around
    them (matmul.Kernel)."""
    if model.config.activation_function in TANH_GELU:
        for block in model.h:
            block.fused = FusedBlock(block)
