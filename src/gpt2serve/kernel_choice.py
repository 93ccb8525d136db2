"""Which kernel multiplies each matrix: chosen by measurement at load (`--kernels auto`).

A kernel tuned on one machine class does not carry over to another: an Intel Xeon's memory
system streamed our int8 kernel at half the share of bandwidth it gets on AMD EPYC, where
MKL's s8 GEMM (CTranslate2) led (docs/benchmarks.md). So, as oneDNN, OpenVINO and CTranslate2
do, the engine settles it on the machine it runs on. The matmuls fall into classes: a matrix
shape (k inputs, n outputs, int8 or fp32) and a number of rows, ROW_CLASSES: decode steps of
1, 2, 4, 8, 16 and 32 rows, and 128 standing for prompt chunks (every pass of more rows). For
each class, every candidate that runs here (matmul.candidates: our kernels in each ISA form,
fp32's with either prefetch target, fbgemm, oneDNN, plain torch) is first checked against a float64 product of the same weights
(a wrong one is never timed, so never chosen), then timed on copies of a layer's matrices
(or the head's) that together do not fit the last-level cache, called in turn as a decode
step reads its layers, and the fastest kept. What it measured is cached per CPU model, ISA cap, thread count and
build (`cache_path`), so a restart reads the table instead of measuring it again, unless
its times are out of an idle machine's bounds (`disturbed`).

`--kernels ours` takes our kernels for every class and `--kernels torch` torch's own (fbgemm
for int8, oneDNN for fp32), without measuring: for A/B runs (bench/offline.py). `--kernels amx`
takes our AMX forms for every class they serve, ours elsewhere: `auto` chooses them by time,
so this is how a test (tests/engine/test_differential.py) or an A/B run holds them to a fixed
schedule on an AMX host.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hardware, kernels, matmul

log = logging.getLogger("gpt2serve.kernels")

MODES = ("auto", "ours", "torch", "amx")
AMX = "ours-amx"  # the candidate `--kernels amx` takes, where it serves
ROW_CLASSES = (1, 2, 4, 8, 16, 32, 128)
PROMPT_ROWS = ROW_CLASSES[-1]
# float64 reference against each candidate: ||y - ref|| / ||ref||. int8 activations
# quantized to u8 (per row or per tensor) measured 0.5-1% on these random weights.
TOLERANCE = {"fp32": 1e-4, "int8": 3e-2, "int4": 3e-2}
BYTES = {"fp32": 4, "int8": 1, "int4": 0.5625}  # a weight's, with int4's fp16 group scales
REPEATS = 3
# The weights a decode step reads: x the last-level cache, timed as if from memory, or the
# model's weights where they come to less (a quantized 124M, 90-127 MB, ran from the 260 MiB
# L3 of an Emerald Rapids Xeon at twice its memory's bandwidth).
WORKING_SET = 1.25
ARITHMETIC = 8
BY_ARITHMETIC = 32
ARITHMETIC_REPEATS = 2
SLOW = 3.0  # a candidate this many times slower than the fastest still running leaves the pass
# and one this many times slower at some rows is not tried at more (torch's weight-only int8
# took 0.7 s a call of the head at 32 rows); oneDNN's int8, slow at one row for the
# quantization of x in torch ops, caught up at 128.
DROP = 10.0
SLACK = 1e-3  # s past SLOW (and DROP) x the fastest: a hiccup of one call of microseconds
# is not slow (calls of 10 us on a test's small matrix were dropped for such hiccups)
# A call of m rows costs at most m / m' calls of m' < m rows (so the fastest at m rows
# within GROWTH x that), and at least about what fewer rows cost (within SHRINK x). A table
# outside those bounds was timed while something else held the cores: measured on the
# 2-core machine while two C builds ran, 768x768 int8 took 26.7 ms a call at 8 rows against
# 0.04 at 4, and the head 116 ms at one row against 14 at 32. Measured once more, and where
# that is no better, served but not cached (a busy first start would otherwise choose for
# every later one).
GROWTH, SHRINK = 2.0, 4.0


def row_class(m: int, classes=ROW_CLASSES) -> int:
    """The class a product of m rows falls in: the smallest at least m, else the largest."""
    return next((r for r in classes if m <= r), classes[-1])


@dataclass
class RowChoice:
    """The candidate chosen for each row class of one matrix shape, with what was measured:
    ms per call by candidate (None where its numerics were wrong)."""

    by_rows: dict[int, str]
    timings: dict[int, dict[str, float | None]] = field(default_factory=dict)

    def pick(self, m: int) -> str:
        return self.by_rows[row_class(m, sorted(self.by_rows))]

    def names(self) -> set[str]:
        return set(self.by_rows.values())


def disturbed(choice: RowChoice) -> list[int]:
    """The row classes whose fastest time is out of GROWTH or SHRINK of another's (the
    module's bounds), each to SLACK: [] for a table an idle machine could have measured."""
    fastest = {m: min(ms for ms in timed.values() if ms is not None)
               for m, timed in choice.timings.items()
               if any(ms is not None for ms in timed.values())}
    slack = SLACK * 1e3
    out = set()
    for fewer in fastest:
        for more in (m for m in fastest if m > fewer):
            if fastest[more] > GROWTH * more / fewer * fastest[fewer] + slack:
                out.add(more)
            if fastest[fewer] > SHRINK * fastest[more] + slack:
                out.add(fewer)
    return sorted(out)


def _random_weights(dtype: str, k: int, n: int, generator: torch.Generator) -> tuple:
    """A matrix as quantize.py or packing.py hands it to a kernel: int8 (q [n, k], scales,
    bias), int4 (q [n, k] in 0..15, scales [n, k / 32], bias) or fp32 (w [k, n], bias)."""
    bias = torch.randn(n, generator=generator) * 0.02
    if dtype == "int4":
        groups = -(-k // kernels.INT4_GROUP)
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
        scales = (torch.rand(n, groups, generator=generator) * 1e-2 + 1e-3).half().float()
        return q, scales, bias
    if dtype == "int8":
        levels = hardware.int8_weight_levels()
        q = torch.randint(-levels, levels + 1, (n, k), dtype=torch.int8, generator=generator)
        return q, torch.rand(n, generator=generator) * 1e-3 + 1e-4, bias
    return torch.randn(k, n, generator=generator) * 0.02, bias


def _dequantized(dtype: str, weights: tuple, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [k, n], bias) in fp32: the product every candidate must give (its fp32 rounding,
    ~1e-6 of it, is far inside TOLERANCE)."""
    if dtype == "int8":
        q, scales, bias = weights
        return (q.float() * scales[:, None]).t(), bias
    if dtype == "int4":
        q, scales, bias = weights
        w = (q.float() - 8) * scales.repeat_interleave(kernels.INT4_GROUP, 1)[:, :k]
        return w.t(), bias
    return weights


def measure(dtype: str, shapes: list[tuple[int, int]], rows: tuple[int, ...] = ROW_CLASSES,
            kinds: dict[str, type[matmul.Kernel]] | None = None, repeats: int = REPEATS,
            model_bytes: float = math.inf, fused: dict[tuple[int, int], set[str]] | None = None,
            pages: kernels.PageArena | None = None) -> dict[tuple[int, int], RowChoice]:
    """Check, then time, every candidate for each (k, n) matrix of `shapes` (a layer's, or the
    head) at each row class (see module doc); `kinds` (name -> kernel) defaults to
    matmul.candidates(dtype). Runs on the calling thread's intra-op threads.

    Each is timed as the engine calls it: with the ops of `fused` (by shape: "ln", "gelu",
    "residual", as packing.FusedBlock runs them), which ours does as it reads and writes and
    the others in torch ops around the product; bound to its buffers for a decode step's
    rows (engine/decode_plan.py), called for a prompt chunk's. (Timed bare, torch's addmm at
    one row came within 5% of ours on a Xeon, and was chosen where the ops around it cost
    the engine more.)

    The calls go as a decode step's do: copy after copy of the group (a layer), and in each,
    every candidate's own copy of each matrix in turn. Between two reads of a copy, every
    candidate has read its other copies: all of them together come to WORKING_SET x the
    last-level cache (or `model_bytes`, all of the model's weights, where that is less), so
    each call reads its weights from memory as a decode step does. The group's matrices
    share that working set, so a first start lays out one working set a group, not one a
    matrix (packing the copies was most of a first start). Where a variant does not serve
    some rows (matmul.Kernel.serves), another of its kernel reads its copies there. A
    candidate that falls SLOW
    behind the fastest leaves the pass; one that leaves two passes is not timed again at
    these rows, and each keeps its fastest pass: a slow spell elsewhere on the machine slows
    a pass, not the candidate (timed one after another, the first table cached on a Xeon ran
    int8 at 0.57x of one measured again). A group larger than its share (the head) is timed
    on its matrices' first outputs, the time scaled to all n (a call's cost grows with the
    outputs, each panel of 16 a stream of its own).

    The copies in huge pages are laid out in `pages` (`arena`), rewound first: a caller that
    measures group after group passes one, so that each reuses the memory the first made."""
    kinds = kinds or matmul.candidates(dtype)
    generator = torch.Generator().manual_seed(sum(k * 100003 + n for k, n in shapes))
    element = BYTES[dtype]
    pages = pages or arena(model_bytes)
    pages.rewind()
    share = _working_set(model_bytes) / len(kinds)
    fit = min(1.0, share / (2 * sum(k * n for k, n in shapes) * element))  # two copies at least
    # whole panels of 16, rounded up: two copies fill the share, not two and a sliver of a
    # third (the head's three copies of 41 MB read 1.5x the working set on a 480 MiB L3)
    timed_n = {(k, n): min(n, -(-max(16, math.ceil(n * fit)) // 16) * 16) for k, n in shapes}
    weights = {(k, n): _random_weights(dtype, k, timed_n[k, n], generator) for k, n in shapes}
    group = sum(k * timed_n[k, n] * element for k, n in shapes)
    copies = max(2, min(64, math.ceil(share / group)))
    # each copy in memory of its own, as each layer's weights are; laid out on every core
    # (fbgemm's and oneDNN's packing run on one), each worker on one intra-op thread
    jobs = [(name, shape) for name in kinds for shape in shapes for _ in range(copies)]
    with ThreadPoolExecutor(torch.get_num_threads(), initializer=_layout_thread,
                            initargs=(pages,)) as pool:
        built = list(pool.map(lambda job: kinds[job[0]](*(
            w if kinds[job[0]].own_layout else w.clone() for w in weights[job[1]])), jobs))
    layouts = {job: built[i * copies:(i + 1) * copies] for i, job in enumerate(jobs[::copies])}
    reference = {(k, n): _dequantized(dtype, weights[k, n], k) for k, n in shapes}
    by_rows = {shape: {} for shape in shapes}
    timings = {shape: {} for shape in shapes}
    dropped = {shape: set() for shape in shapes}  # out of the running at fewer rows
    for m in rows:
        running, seen = {}, {}
        for k, n in shapes:
            seen[k, n], running[k, n] = _check(dtype, k, n, m, kinds, layouts, reference[k, n],
                                               dropped[k, n], generator)
        # Past ARITHMETIC rows a call is bound by arithmetic more than by memory (fp32 and
        # int8 alike here): fewer copies, each class timed in about the same time; from
        # BY_ARITHMETIC rows (32 and prompt chunks), by arithmetic alone, on one copy and in
        # fewer passes (on the 260 MiB L3 of a Xeon, whose working set leaves three copies
        # a candidate, two copies at 32 rows took twice 16 rows' time).
        alone = m >= BY_ARITHMETIC
        used = 1 if alone else max(2, copies * ARITHMETIC // max(m, ARITHMETIC))
        calls, held = {}, []  # (held: the bound calls have their buffers' addresses only)
        for shape, names in running.items():
            calls[shape], buffers = _calls(shape, m, timed_n[shape], used,
                                           (fused or {}).get(shape, set()), kinds, layouts,
                                           _lent(names, kinds, m), generator)
            held.append(buffers)
        passes = {(shape, name): [] for shape in shapes for name in running[shape]}
        left: dict[tuple, int] = {}  # passes each candidate left early
        for _ in range(min(repeats, ARITHMETIC_REPEATS) if alone else repeats):
            spent = dict.fromkeys(passes, 0.0)
            in_pass = {shape: list(names) for shape, names in running.items()}
            for i in range(used):
                for shape in shapes:
                    for name in in_pass[shape]:
                        start = time.perf_counter()
                        for call in calls[shape][name][i]:
                            call()
                        spent[shape, name] += (time.perf_counter() - start) / len(
                            calls[shape][name][i])
                    fastest = min((spent[shape, r] for r in in_pass[shape]), default=0.0)
                    for name in [r for r in in_pass[shape]
                                 if spent[shape, r] > SLOW * fastest + SLACK]:
                        passes[shape, name].append(spent[shape, name] / (i + 1))
                        in_pass[shape].remove(name)
                        left[shape, name] = left.get((shape, name), 0) + 1
                        if left[shape, name] == 2:
                            running[shape].remove(name)
            for shape, names in in_pass.items():
                for name in names:
                    passes[shape, name].append(spent[shape, name] / used)
        for (shape, name), times in passes.items():
            seen[shape][name] = min(times) * shape[1] / timed_n[shape] * 1e3
        for shape in shapes:
            timed = {name: ms for name, ms in seen[shape].items() if ms is not None}
            if not timed:
                raise RuntimeError(f"no kernel computes a {dtype} {shape[0]}x{shape[1]} product "
                                   "correctly here")
            dropped[shape] |= {name for name, ms in timed.items()
                               if ms > DROP * min(timed.values()) + SLACK * 1e3}
            by_rows[shape][m] = min(timed, key=timed.get)
            timings[shape][m] = seen[shape]
    return {shape: RowChoice(by_rows[shape], timings[shape]) for shape in shapes}


def _working_set(model_bytes: float) -> float:
    """The bytes a pass of measure reads (WORKING_SET)."""
    return min(WORKING_SET * hardware.last_level_cache(), model_bytes)


def arena(model_bytes: float = math.inf) -> kernels.PageArena:
    """Memory for measure's copies of any group: a candidate's come to at most its share
    and one group, a group to at most half a share, so all of them to 1.5x the working set
    and a few panels of padding. Only what they write is ever backed."""
    return kernels.PageArena(int(2 * _working_set(model_bytes)))


def _layout_thread(pages: kernels.PageArena) -> None:
    torch.set_num_threads(1)
    pages.lend()


def _calls(shape: tuple[int, int], m: int, timed_n: int, used: int, ops: set[str],
           kinds: dict, layouts: dict, read: dict[str, list[str]],
           generator: torch.Generator) -> tuple[dict[str, list[list]], tuple]:
    """Each candidate's calls of a pass at m rows, as the engine makes them (see measure):
    for each of the `used` copies, one call on each copy it reads (`read`, _lent); and the
    buffers they are bound to, which the caller keeps alive while it calls them."""
    k = shape[0]
    x = torch.randn(m, k, generator=generator)
    fused = {"gelu": "gelu" in ops}
    if "ln" in ops:
        fused["ln"] = torch.nn.LayerNorm(k).requires_grad_(False)
    if "residual" in ops:
        fused["residual"] = torch.randn(m, timed_n, generator=generator)
    y = torch.empty(m, timed_n)
    normed = {"normed": torch.empty(m, k)} if "ln" in ops else {}

    def call(layout, variant):
        if m == PROMPT_ROWS:  # a prompt chunk's: FusedBlock.forward calls it
            return functools.partial(layout, x, variant, **fused)
        return matmul.bind(layout, variant, x, y, **fused, **normed)
    calls = {name: [[call(layouts[owner, shape][i], kinds[name].variants[name])
                     for owner in owners] for i in range(used)]
             for name, owners in read.items()}
    return calls, (x, y, fused, normed)


def _lent(names: list[str], kinds: dict, m: int) -> dict[str, list[str]]:
    """Whose copies each candidate of `names` reads at m rows: its own, and those of the
    variants of its kernel that do not serve m rows (matmul.Kernel.serves), shared out in
    turn, so that a pass still reads every copy once (the working set the copies were laid
    out for) when fewer candidates run."""
    serving = [name for name in names if kinds[name].serves(name, m)]
    read = {name: [name] for name in serving}
    for kind in {kinds[name] for name in serving}:
        mine = [name for name in serving if kinds[name] is kind]
        idle = [name for name in kinds if kinds[name] is kind and name not in serving]
        for i, name in enumerate(idle):
            read[mine[i % len(mine)]].append(name)
    return read


def _check(dtype: str, k: int, n: int, m: int, kinds: dict, layouts: dict, reference: tuple,
           dropped: set[str], generator: torch.Generator) -> tuple[dict, list[str]]:
    """The candidates (not `dropped`) whose product of m rows is right, and None for each
    that is wrong. Each is checked on rows of its own: memory another candidate just filled
    with the right product must not pass for this one's. Their references in one product:
    the weights are read once for all of them; that fp32 product is held until the checks
    end, or a candidate that writes nothing could be handed its memory, the first rows
    right. The check is each one's first call at m rows too (oneDNN creates its primitive
    then), so the timing that follows leaves it out."""
    w, bias = reference
    trying = [name for name in kinds if name not in dropped and kinds[name].serves(name, m)]
    checks = torch.randn(len(trying) * m, k, generator=generator)
    product = torch.addmm(bias, checks, w)
    refs = product.double()
    seen, right = {}, []
    for i, name in enumerate(trying):
        check, ref = checks[i * m:(i + 1) * m], refs[i * m:(i + 1) * m]
        try:
            y = layouts[name, (k, n)][0](check, kinds[name].variants[name])
            error = float((y.double() - ref).norm() / ref.norm())
        except (RuntimeError, ValueError) as e:  # a kernel that cannot take this shape
            log.debug("kernel %s fails on %s %dx%d, %d rows: %s", name, dtype, k, n, m, e)
            error = math.inf
        if not error <= TOLERANCE[dtype]:  # (NaN too)
            seen[name] = None
        else:
            right.append(name)
    del product
    return seen, right


def fixed(dtype: str, mode: str, rows: tuple[int, ...] = ROW_CLASSES) -> RowChoice:
    """`--kernels ours|torch|amx`: a candidate for every class, unmeasured. Ours falls back to
    torch's where ours does not run here, AMX to ours where it does not run or serve."""
    names = matmul.candidates(dtype)
    theirs = next(name for name in ("fbgemm", "onednn", "torch") if name in names)
    ours = [name for name in names if name.startswith("ours")]
    if mode == "torch" or not ours:
        return RowChoice({m: theirs for m in rows})
    amx = mode == "amx" and AMX in names
    return RowChoice({m: AMX if amx and names[AMX].serves(AMX, m) else ours[0] for m in rows})


def machine_key(threads: int) -> str:
    """What a measured choice holds for: this CPU model (its name and, as VMs often name
    every Xeon "Intel(R) Xeon(R) Processor", its family and model numbers) and ISA under its
    caps, the thread count, torch's version and our kernels' build (the C module, the
    candidates' code and this measuring code: a table measured another way is measured
    again)."""
    cpu = hardware.cpu_info()
    model = (f"{cpu.get('model name', 'unknown CPU')} (family {cpu.get('cpu family', '?')} "
             f"model {cpu.get('model', '?')})")
    caps = " ".join(f"{k}={v}" for k, v in sorted(hardware.isa_caps().items()))
    build = hashlib.sha256()
    for module in (kernels._kernels, matmul, kernels, sys.modules[__name__]):
        if module is not None:
            build.update(Path(module.__file__).read_bytes())
    return (f"{model} | {hardware.host_isa()} | cap {caps or 'none'} | {threads} threads | "
            f"torch {torch.__version__} | build {build.hexdigest()[:12]}")


def cache_path() -> Path:
    """$GPT2SERVE_CACHE_DIR, else $XDG_CACHE_HOME/gpt2serve, else ~/.cache/gpt2serve."""
    root = os.environ.get("GPT2SERVE_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(xdg) / "gpt2serve"
    return Path(root) / "kernels.json"


_cache_lock = threading.Lock()


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entries: dict) -> None:
    """Merge entries under key, written whole through a temporary file (a reader never sees
    half a file); a cache that cannot be written is only a warning."""
    try:
        data = _read_cache(path)
        data.setdefault(key, {}).update(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("kernel choice not cached (%s): %s", path, e)


def _shape_key(dtype: str, k: int, n: int) -> str:
    return f"{dtype} {k}x{n}"


class KernelTable:
    """The choice for each matrix shape of one model (`choice`), made by `mode`."""

    def __init__(self, mode: str, choices: dict[tuple[str, int, int], RowChoice],
                 seconds: float = 0.0, cached: int = 0):
        self.mode, self.choices, self.seconds, self.cached = mode, choices, seconds, cached

    def matmul(self, dtype: str, weights: tuple) -> matmul.Matmul:
        """A Matmul of these weights (int8: q [n, k], scales, bias; int4: q [n, k], scales
        [n, ceil(k / 32)], bias; fp32: w [k, n], bias)."""
        n, k = weights[0].shape if dtype != "fp32" else weights[0].shape[::-1]
        return matmul.Matmul(self.choices[(dtype, k, n)], weights, matmul.candidates(dtype))

    def describe(self) -> str:
        """The table for the start-up log and `gpt2serve kernels`: per shape, each row class's
        choice, and its ms per call where measured."""
        how = (f"measured in {self.seconds:.1f} s, {self.cached} of {len(self.choices)} "
               f"from {cache_path()}" if self.mode == "auto" else "fixed, not measured")
        lines = [f"kernels ({self.mode}: {how}); rows -> kernel (ms a call)"]
        for (dtype, k, n), choice in sorted(self.choices.items()):
            cells = []
            for m, name in sorted(choice.by_rows.items()):
                ms = choice.timings.get(m, {}).get(name)
                cells.append(f"{m}: {name}" + (f" ({ms:.3f})" if ms is not None else ""))
            lines.append(f"  {dtype} {k}x{n}: " + ", ".join(cells))
        return "\n".join(lines)


def for_model(config, dtype: str, mode: str = "auto", threads: int | None = None,
              head_dtype: str | None = None) -> KernelTable:
    """The table for every matrix a GPT-2 layer (weights `dtype`) and its LM head (weights
    `head_dtype`, by default the same) multiply (model.GPTConfig)."""
    d, mlp = config.n_embd, config.mlp_dim
    layers = [(d, 3 * d, False), (d, d, False), (d, mlp, False), (mlp, d, False)]
    # the ops packing.FusedBlock runs with each of a layer's matrices
    fused = {(d, 3 * d): {"ln"}, (d, d): {"residual"}, (d, mlp): {"ln", "gelu"},
             (mlp, d): {"residual"}}
    head = [(d, config.vocab_size, True)]
    head_dtype = head_dtype or dtype
    model_bytes = (config.n_layer * sum(k * n for k, n, _ in layers) * BYTES[dtype]
                   + d * config.vocab_size * BYTES[head_dtype])
    if head_dtype == dtype:
        return choose(dtype, layers + head, mode, threads, model_bytes, fused)
    tables = (choose(dtype, layers, mode, threads, model_bytes, fused),
              choose(head_dtype, head, mode, threads, model_bytes))
    return KernelTable(mode, {key: choice for t in tables for key, choice in t.choices.items()},
                       sum(t.seconds for t in tables), sum(t.cached for t in tables))


def choose(dtype: str, shapes: list[tuple[int, int, bool]], mode: str = "auto",
           threads: int | None = None, model_bytes: float = math.inf,
           fused: dict[tuple[int, int], set[str]] | None = None) -> KernelTable:
    """The table for these shapes. `auto` measures what the cache does not hold, on a
    thread of its own with the engine's `threads` (an OpenMP team left on the loading thread
    slowed every later step of the engine's; the measuring thread's team ends with it). The
    head's classes stop at 32 rows: a prompt's pass multiplies only its last rows by it.
    `model_bytes`: all the model's weights (see WORKING_SET); `fused`: the ops around each
    matrix (see measure)."""
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {', '.join(MODES)}, not {mode!r}")
    classes = {(k, n): ROW_CLASSES[:-1] if head else ROW_CLASSES for k, n, head in shapes}
    if mode != "auto":
        return KernelTable(mode, {(dtype, k, n): fixed(dtype, mode, rows)
                                  for (k, n), rows in classes.items()})
    threads = threads or hardware.default_threads()
    key, path = machine_key(threads), cache_path()
    start, result, cached, fresh = time.perf_counter(), {}, 0, {}
    with _cache_lock:
        known = _read_cache(path).get(key, {})
        # A table naming a kernel that does not run here is measured again: the same key
        # holds where Linux lends AMX's tiles to one process and not to another.
        runs_here = set(matmul.candidates(dtype))
        missing = []
        for (k, n), rows in classes.items():
            entry = known.get(_shape_key(dtype, k, n))
            choice = None
            if (entry and set(map(int, entry["by_rows"])) == set(rows)
                    and set(entry["by_rows"].values()) <= runs_here):
                choice = RowChoice({int(m): name for m, name in entry["by_rows"].items()},
                                   {int(m): t for m, t in entry["timings"].items()})
            # (a table cached before the bounds were checked is held to them too)
            if choice is not None and not disturbed(choice):
                result[(dtype, k, n)] = choice
                cached += 1
            else:
                missing.append((k, n, rows))
        if missing:
            groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # a layer's, the head
            for k, n, rows in missing:
                groups.setdefault(rows, []).append((k, n))

            plausible: set[tuple[int, int]] = set()  # measured undisturbed: to cache

            def run() -> None:
                torch.set_num_threads(threads)
                pages = arena(model_bytes)
                for rows, group in groups.items():
                    for again in (False, True):
                        measured = measure(dtype, group, rows, model_bytes=model_bytes,
                                           fused=fused, pages=pages)
                        busy = {shape: classes for shape, c in measured.items()
                                if (classes := disturbed(c))}
                        if not busy or again:
                            break
                        log.info("kernel timings out of bounds (%s): measured again",
                                 _busy_text(dtype, busy))
                    if busy:
                        log.warning("kernel timings out of bounds again (%s): something "
                                    "else held the cores; this table serves, uncached",
                                    _busy_text(dtype, busy))
                    for (k, n), choice in measured.items():
                        result[(dtype, k, n)] = choice
                        if (k, n) not in busy:
                            plausible.add((k, n))
            failure: list[BaseException] = []
            worker = threading.Thread(target=lambda: _capture(run, failure),
                                      name="gpt2serve-kernel-choice")
            worker.start()
            worker.join()
            if failure:
                raise failure[0]
            for k, n, rows in missing:
                if (k, n) not in plausible:
                    continue
                choice = result[(dtype, k, n)]
                fresh[_shape_key(dtype, k, n)] = {"by_rows": choice.by_rows,
                                                  "timings": choice.timings}
            if fresh:
                _write_cache(path, key, fresh)
    return KernelTable(mode, result, time.perf_counter() - start, cached)


def _busy_text(dtype: str, busy: dict[tuple[int, int], list[int]]) -> str:
    return "; ".join(f"{dtype} {k}x{n} at rows {', '.join(map(str, classes))}"
                     for (k, n), classes in busy.items())


def _capture(run, failure: list[BaseException]) -> None:
    try:
        run()
    except BaseException as e:  # re-raised on the loading thread
        failure.append(e)
