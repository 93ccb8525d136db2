"""The CPU kernels that can multiply a linear layer, and one matrix held in those chosen for it.

A `Matmul` is x @ W + bias for one weight matrix, int8 or int4 (quantize.py) or fp32
(packing.py).
Each kernel below holds W in its own layout and computes the same product; which one serves
a call depends on its number of rows, as kernel_choice.py measured (decode steps of a few rows
stream the weights, prompts are bound by arithmetic). Ours can also apply a layer's small ops
as it reads and writes (a LayerNorm of x, GELU, a residual add: `fused`); the others do them
with torch ops around the product, so every kernel serves packing.FusedBlock and the
replayed decode plan (engine/decode_plan.py).

int8 (per-row weights `q` [n, k], `scales` [n]): ours (kernels.int8_linear: each row of x
quantized on its own, AMX, VNNI or AVX2), fbgemm's and oneDNN's dynamic int8 GEMMs (x
quantized per tensor: a row's result depends on its neighbours), torch's weight-only int8
matmul (x stays fp32). int4 (`q` [n, k] in 0..15 and a scale per group of 32 inputs): ours
(kernels.int4_linear, x quantized per group: AMX, VNNI, AVX-512 or AVX2) and torch's
weight-only int4 matmul. fp32 (W [k, n]): ours (kernels.linear_f32, AVX-512 or AVX2),
oneDNN's inner product on its packed layout, and torch's plain addmm. Each of our forms
that streams its weights comes twice at one or two rows: prefetching the next panel into L1
(-l1) or into L2, whichever the CPU streams faster (L1_ROWS).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import kernels

# Quantized tensor types are deprecated in favour of torchao, but fbgemm's packed kernels take
# nothing else (torch 2.13), and quantize.py makes its int8 rows with them. Filtered once here:
# a filter set around each call (catch_warnings) resets what every warning registry has shown,
# so each model load printed the server's deprecation warnings again.
warnings.filterwarnings("ignore", category=UserWarning,
                        message="torch.quantize_per_tensor, torch.quantize_per_channel and other")


def _torch_around(product: Callable[[Tensor], Tensor], x: Tensor, ln: nn.LayerNorm | None,
                  gelu: bool, residual: Tensor | None) -> Tensor:
    """`fused` done with torch ops around a kernel that multiplies only."""
    if ln is not None:
        x = nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    y = product(x)
    if gelu:
        y = nn.functional.gelu(y, approximate="tanh")
    return y if residual is None else y + residual


class Kernel:
    """One layout of one matrix; `variants`: the candidate names it answers to (kernel
    choice's names), each with the argument its calls pass (an ISA)."""

    variants: dict[str, object] = {}
    dtype = ""  # "int8" or "fp32": the weights it takes
    # Whether it lays W out in memory of its own, or holds the tensor it was given (then each
    # copy kernel_choice times must be given a copy of W).
    own_layout = True

    @classmethod
    def runs(cls, variant: str) -> bool:
        return True

    @classmethod
    def serves(cls, variant: str, m: int) -> bool:
        """Whether the variant is a candidate for products of m rows: one that differs from
        another only up to some rows is not timed past them."""
        return True

    def product(self, x: Tensor, variant) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, variant=None, ln: nn.LayerNorm | None = None,
                 gelu: bool = False, residual: Tensor | None = None) -> Tensor:
        return _torch_around(lambda v: self.product(v, variant), x, ln, gelu, residual)

    def bind(self, x: Tensor, y: Tensor, variant=None, **fused) -> Callable[[], None]:
        """This product into y, as a call of no arguments bound to x's and y's memory (see
        kernels.bind_decode_attention)."""
        return lambda: y.copy_(self(x, variant, **fused))


# Up to this many rows, the -l1 forms of our kernels prefetch the next panel into L1, where
# the others prefetch into L2: at one row, L1 ran 1.19-1.27x faster on AMD EPYC, and L2 1.26x
# faster on an Emerald Rapids Xeon (fp32) and 1.19x on an AMX Xeon (int4; docs/benchmarks.md,
# "Why it is fast"). Past these rows an -l1 form is its plain one, and not a candidate.
L1_ROWS = 2


def _l1_serves(l1_rows: int, m: int) -> bool:
    return not l1_rows or m <= l1_rows


# ---- int8 ----------------------------------------------------------------------------------

class OursInt8(Kernel):
    """kernels.int8_linear on pack_int8's panels; each variant a form (2 AMX, 1 VNNI, 0 AVX2)
    and the rows up to which it prefetches into L1 (the -l1 forms, as OursF32's). Its AVX2
    form needs 7-bit weights, which quantize.py gives exactly where fbgemm lacks VNNI; so only
    the form the weights allow runs, and AMX's beside VNNI's where the CPU has it (all give the
    same sums)."""

    # (AMX last, as OursInt4's; its tiles are for more rows than L1 would serve)
    variants = {"ours-vnni-l1": (1, L1_ROWS), "ours-vnni": (1, 0),
                "ours-avx2-l1": (0, L1_ROWS), "ours-avx2": (0, 0), "ours-amx": (2, 0)}
    dtype = "int8"

    @classmethod
    def runs(cls, variant: str) -> bool:
        form = cls.variants[variant][0]
        return kernels.INT8_RUNS and (form == 0) != kernels.INT8_VNNI and (
            form < 2 or kernels.AMX)

    @classmethod
    def serves(cls, variant: str, m: int) -> bool:
        return _l1_serves(cls.variants[variant][1], m)

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None):
        self.packed, self.sums = kernels.pack_int8(q)
        self.scales = torch.zeros(self.sums.shape[0])  # padded like the panels
        self.scales[:q.shape[0]] = scales
        self.bias, self.n = bias, q.shape[0]

    def __call__(self, x: Tensor, variant=(kernels.INT8_VNNI, L1_ROWS), **fused) -> Tensor:
        form, l1_rows = variant
        return kernels.int8_linear(x, self.packed, self.sums, self.scales, self.bias, self.n,
                                   form=form, l1_rows=l1_rows, **fused)

    def bind(self, x: Tensor, y: Tensor, variant=(kernels.INT8_VNNI, L1_ROWS), ln=None,
             normed=None, **fused) -> Callable[[], None]:
        form, l1_rows = variant
        return kernels.bind_int8_linear(x, self.packed, self.sums, self.scales, self.bias, y,
                                        form=form, ln=ln, normed=normed, l1_rows=l1_rows,
                                        **fused)


class FbgemmInt8(Kernel):
    """fbgemm's dynamic int8 GEMM (`quantized::linear_dynamic`): x per tensor."""

    variants = {"fbgemm": None}
    dtype = "int8"

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None):
        qt = torch._make_per_channel_quantized_tensor(
            q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qt, bias)

    def product(self, x: Tensor, variant) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)


class OneDnnInt8(Kernel):
    """oneDNN's int8 inner product as Inductor calls it (`onednn::qlinear_pointwise`), x
    quantized per tensor to u8 here."""

    variants = {"onednn": None}
    dtype = "int8"

    @classmethod
    def runs(cls, variant: str) -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn,
                                                                "qlinear_pointwise")

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None):
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.scales, self.bias = scales.float().contiguous(), bias
        self.zeros = torch.zeros(q.shape[0], dtype=torch.long)

    def product(self, x: Tensor, variant) -> Tensor:
        lo, hi = (float(v) for v in torch.aminmax(x))
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255 or 1.0
        zero = round(-lo / scale)
        qx = (x / scale).round_().add_(zero).clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, scale, zero, self.packed, self.scales,
                                                  self.zeros, self.bias, 1.0, 0,
                                                  torch.float32, "none", [], "")


class TorchInt8(Kernel):
    """torch's weight-only int8 matmul (`_weight_int8pack_mm`): x in fp32, exact but slow on
    CPU (fp32 activations; docs/benchmarks.md)."""

    variants = {"torch": None}
    dtype = "int8"
    own_layout = False

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None):
        self.q, self.scales, self.bias = q.contiguous(), scales.float().contiguous(), bias

    def product(self, x: Tensor, variant) -> Tensor:
        y = torch._weight_int8pack_mm(x.contiguous(), self.q, self.scales)
        return y if self.bias is None else y.add_(self.bias)


# ---- int4 ----------------------------------------------------------------------------------

class OursInt4(Kernel):
    """kernels.int4_linear on pack_int4's panels: AMX, VNNI, AVX-512 or AVX2 (isa 4 to 1),
    each that runs here a candidate (all give the same sums), with the rows up to which it
    prefetches into L1 (the -l1 forms, as OursF32's)."""

    # (`--kernels ours` takes the first that runs: AMX, faster only from some rows, is last)
    variants = {"ours-vnni-l1": (3, L1_ROWS), "ours-vnni": (3, 0),
                "ours-avx512-l1": (2, L1_ROWS), "ours-avx512": (2, 0),
                "ours-avx2-l1": (1, L1_ROWS), "ours-avx2": (1, 0), "ours-amx": (4, 0)}
    dtype = "int4"
    # AMX's tiles cost a round trip through memory a block whatever the rows, which one or two
    # rows do not repay: there it ran 0.7x VNNI on an AMX Xeon (bench/kernels.py --parts int4).
    AMX_FROM_ROWS = 4

    @classmethod
    def runs(cls, variant: str) -> bool:
        return kernels.INT4_ISA >= cls.variants[variant][0]

    @classmethod
    def serves(cls, variant: str, m: int) -> bool:
        isa, l1_rows = cls.variants[variant]
        return _l1_serves(l1_rows, m) and (isa != 4 or m >= cls.AMX_FROM_ROWS)

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None):
        self.packed, self.bias, self.n = kernels.pack_int4(q, scales), bias, q.shape[0]

    def __call__(self, x: Tensor, variant=(kernels.INT4_ISA, L1_ROWS), **fused) -> Tensor:
        isa, l1_rows = variant
        return kernels.int4_linear(x, self.packed, self.bias, self.n, isa=isa, l1_rows=l1_rows,
                                   **fused)

    def bind(self, x: Tensor, y: Tensor, variant=(kernels.INT4_ISA, L1_ROWS), **fused
             ) -> Callable[[], None]:
        isa, l1_rows = variant
        return kernels.bind_int4_linear(x, self.packed, self.bias, y, isa=isa, l1_rows=l1_rows,
                                        **fused)


class TorchInt4(Kernel):
    """torch's weight-only int4 matmul (`_weight_int4pack_mm_for_cpu`, w = (q - 8) * scale +
    zero per group): x stays fp32; the fallback where ours does not run, and slow (a decode
    step's matmul took 30x ours here)."""

    variants = {"torch": None}
    dtype = "int4"

    @classmethod
    def runs(cls, variant: str) -> bool:
        return hasattr(torch, "_weight_int4pack_mm_for_cpu")

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None):
        # zero weights (q = 8) up to k a whole group and n a whole 16, as torch's layout takes
        (self.n, k), groups = q.shape, scales.shape[1]
        self.k, n16 = groups * kernels.INT4_GROUP, -(-self.n // 16) * 16
        padded = nn.functional.pad(q.int(), (0, self.k - k, 0, n16 - self.n), value=8)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1)
        scales = nn.functional.pad(scales, (0, 0, 0, n16 - self.n)).t()
        self.scales_zeros = torch.stack([scales, torch.zeros_like(scales)], -1).contiguous()
        self.bias = bias

    def product(self, x: Tensor, variant) -> Tensor:
        x = nn.functional.pad(x, (0, self.k - x.shape[1]))
        y = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed,
                                              kernels.INT4_GROUP, self.scales_zeros)[:, :self.n]
        return y if self.bias is None else y + self.bias


# ---- fp32 ----------------------------------------------------------------------------------

class OursF32(Kernel):
    """kernels.linear_f32 on pack_f32's panels, in huge pages; each variant an ISA (2 AVX-512,
    1 AVX2) and the rows up to which it prefetches into L1 (the -l1 forms, candidates only
    up to those rows: past them they are the plain forms)."""

    variants = {"ours-avx512-l1": (2, L1_ROWS), "ours-avx512": (2, 0),
                "ours-avx2-l1": (1, L1_ROWS), "ours-avx2": (1, 0)}
    dtype = "fp32"

    @classmethod
    def runs(cls, variant: str) -> bool:
        return kernels.F32_RUNS and kernels.VECTOR_ISA >= cls.variants[variant][0]

    @classmethod
    def serves(cls, variant: str, m: int) -> bool:
        return _l1_serves(cls.variants[variant][1], m)

    def __init__(self, w: Tensor, bias: Tensor | None):
        self.panels, self.bias, self.n = kernels.pack_f32(w), bias, w.shape[1]

    def __call__(self, x: Tensor, variant=(kernels.VECTOR_ISA, L1_ROWS), **fused) -> Tensor:
        isa, l1_rows = variant
        return kernels.linear_f32(x, self.panels, self.bias, self.n, isa=isa, l1_rows=l1_rows,
                                  **fused)

    def bind(self, x: Tensor, y: Tensor, variant=(kernels.VECTOR_ISA, L1_ROWS), **fused
             ) -> Callable[[], None]:
        isa, l1_rows = variant
        return kernels.bind_linear_f32(x, self.panels, self.bias, y, isa=isa, l1_rows=l1_rows,
                                       **fused)


# oneDNN picks a blocked layout for an expected batch size; 32 was as fast as the best choice
# at every batch from 1 to 32.
BATCH_HINT = 32


class OneDnnF32(Kernel):
    """oneDNN's fp32 inner product on weights it reordered once."""

    variants = {"onednn": None}
    dtype = "fp32"

    @classmethod
    def runs(cls, variant: str) -> bool:
        return torch.backends.mkldnn.is_available()

    def __init__(self, w: Tensor, bias: Tensor | None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), BATCH_HINT)
        self.bias = bias

    def product(self, x: Tensor, variant) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class TorchF32(Kernel):
    """torch's addmm on W as HF stores it ([k, n]): what the eager model runs."""

    variants = {"torch": None}
    dtype = "fp32"
    own_layout = False

    def __init__(self, w: Tensor, bias: Tensor | None):
        self.w, self.bias = w.contiguous(), bias

    def product(self, x: Tensor, variant) -> Tensor:
        if self.bias is None:
            return x @ self.w
        return torch.addmm(self.bias, x, self.w)


KERNELS = {"int8": [OursInt8, FbgemmInt8, OneDnnInt8, TorchInt8],
           "int4": [OursInt4, TorchInt4],
           "fp32": [OursF32, OneDnnF32, TorchF32]}
OURS = (OursInt8, OursInt4, OursF32)


def candidates(dtype: str, kernel_types=None) -> dict[str, type[Kernel]]:
    """Every candidate name that runs here for weights of `dtype`, and its kernel."""
    return {name: kind for kind in (kernel_types or KERNELS[dtype])
            for name in kind.variants if kind.runs(name)}


class Matmul:
    """x @ W + bias for one matrix, held in the layouts of the kernels `choice` names: each
    call goes to the kernel chosen for its number of rows (kernel_choice.RowChoice). `ours`
    is our kernel's layout, kept wherever it runs (the embedding's rows, the LM head's
    screen and the decode plan read it), or None."""

    def __init__(self, choice, weights: tuple, kinds: dict[str, type[Kernel]]):
        self.choice = choice
        layouts: dict[type[Kernel], Kernel] = {}
        ours = next((k for k in kinds.values() if k in OURS), None)
        for kind in {kinds[name] for name in choice.names()} | ({ours} - {None}):
            layouts[kind] = kind(*weights)
        self.ours = layouts.get(ours) if ours else None
        self.kernels = {name: (layouts[kinds[name]], kinds[name].variants[name])
                        for name in choice.names()}

    def kernel(self, m: int) -> tuple[Kernel, object]:
        return self.kernels[self.choice.pick(m)]

    def __call__(self, x: Tensor, **fused) -> Tensor:
        kernel, variant = self.kernel(x.shape[0])
        return kernel(x, variant, **fused)

    def bind(self, x: Tensor, y: Tensor, **fused) -> Callable[[], None]:
        """This product into y for x's number of rows, bound to their memory."""
        return bind(*self.kernel(x.shape[0]), x, y, **fused)


def bind(kernel: Kernel, variant, x: Tensor, y: Tensor, **fused) -> Callable[[], None]:
    """Kernel.bind with the ops `fused` around it; `normed` (room for layer-normed rows) is
    ours alone to use."""
    if not isinstance(kernel, OURS):
        fused.pop("normed", None)
    return kernel.bind(x, y, variant, **fused)
