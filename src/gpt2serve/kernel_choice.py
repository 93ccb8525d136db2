"""Which kernel multiplies each matrix: chosen by measurement at load (`--kernels auto`).

A kernel tuned on one machine class does not carry over to another: an Intel Xeon's memory
system streamed our int8 kernel at half the share of bandwidth it gets on AMD EPYC, where
MKL's s8 GEMM (CTranslate2) led (docs/benchmarks.md). So, as oneDNN, OpenVINO and CTranslate2
do, the engine settles it on the machine it runs on. The matmuls fall into classes: a matrix
shape (k inputs, n outputs, int8 or fp32) and a number of rows, ROW_CLASSES: decode steps of
1, 2, 4, 8, 16 and 32 rows, and 128 standing for prompt chunks (every pass of more rows). For
each class, every candidate that runs here (matmul.candidates: our kernels in each ISA form,
fbgemm, oneDNN, plain torch) is first checked against a float64 product of the same weights
(a wrong one is never timed, so never chosen), then timed on copies of the matrix that
together do not fit the last-level cache, called in turn as a decode step reads its layers,
and the fastest kept. What it measured is cached per CPU model, ISA cap, thread count and
build (`cache_path`), so a restart reads the table instead of measuring it again.

`--kernels ours` takes our kernels for every class and `--kernels torch` torch's own (fbgemm
for int8, oneDNN for fp32), without measuring: for A/B runs (bench/offline.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hardware, kernels, matmul

log = logging.getLogger("gpt2serve.kernels")

MODES = ("auto", "ours", "torch")
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
SLOW = 3.0  # a candidate this many times slower than the fastest still running leaves the pass
# and one this many times slower at some rows is not tried at more (torch's weight-only int8
# took 0.7 s a call of the head at 32 rows); oneDNN's int8, slow at one row for the
# quantization of x in torch ops, caught up at 128.
DROP = 10.0
SLACK = 1e-3  # s past SLOW x the fastest: a hiccup of one call of microseconds is not slow


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


def measure(dtype: str, k: int, n: int, rows: tuple[int, ...] = ROW_CLASSES,
            kinds: dict[str, type[matmul.Kernel]] | None = None,
            repeats: int = REPEATS, model_bytes: float = math.inf) -> RowChoice:
    """Check, then time, every candidate for a k x n matrix at each row class (see module
    doc); `kinds` (name -> kernel) defaults to matmul.candidates(dtype). Runs on the calling
    thread's intra-op threads.

    The candidates' calls interleave, one copy of the weights each in turn, and each
    candidate keeps its fastest pass over its copies. Between two reads of a copy, every
    candidate has read a copy of its own: all of their copies together come to WORKING_SET x
    the last-level cache (or `model_bytes`, all of the model's weights, where that is less),
    so each call reads its weights from memory as a decode step does, while each candidate
    lays out only its share (packing the copies was most of a first start). And a slow spell
    elsewhere on the machine slows a pass of every candidate, not every pass of one (timed one
    after another, the first table cached on a Xeon ran int8 at 0.57x of one measured again).
    A large matrix is timed on its first outputs, its time scaled to all n (a call's cost
    grows with the outputs, each panel of 16 a stream of its own)."""
    kinds = kinds or matmul.candidates(dtype)
    generator = torch.Generator().manual_seed(k * 100003 + n)
    element = BYTES[dtype]
    share = min(WORKING_SET * hardware.last_level_cache(), model_bytes) / len(kinds)
    timed_n = min(n, max(16, int(share / (k * element)) // 16 * 16))
    weights = _random_weights(dtype, k, timed_n, generator)
    copies = max(2, min(64, math.ceil(share / (k * timed_n * element))))
    # each copy in memory of its own, as each layer's weights are; laid out on every core
    # (fbgemm's and oneDNN's packing run on one), each worker on one intra-op thread
    jobs = [kind for kind in kinds.values() for _ in range(copies)]
    with ThreadPoolExecutor(torch.get_num_threads(), initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        built = list(pool.map(lambda kind: kind(*(w.clone() for w in weights)), jobs))
    layouts = {name: built[i * copies:(i + 1) * copies] for i, name in enumerate(kinds)}
    w, bias = _dequantized(dtype, weights, k)
    by_rows, timings = {}, {}
    dropped: set[str] = set()  # out of the running at fewer rows: not tried at more
    for m in rows:
        x = torch.randn(m, k, generator=generator)
        seen: dict[str, float | None] = {}
        # Each candidate is checked on rows of its own: memory another candidate just filled
        # with the right product must not pass for this one's. Their references in one
        # product: the weights are read once for all of them.
        trying = [name for name in kinds if name not in dropped]
        checks = torch.randn(len(trying) * m, k, generator=generator)
        refs = torch.addmm(bias, checks, w).double()
        running = []
        for i, name in enumerate(trying):
            variant = kinds[name].variants[name]
            check, ref = checks[i * m:(i + 1) * m], refs[i * m:(i + 1) * m]
            try:
                y = layouts[name][0](check, variant)
                error = float((y.double() - ref).norm() / ref.norm())
            except (RuntimeError, ValueError) as e:  # a kernel that cannot take this shape
                log.debug("kernel %s fails on %s %dx%d, %d rows: %s", name, dtype, k, n, m, e)
                error = math.inf
            if not error <= TOLERANCE[dtype]:  # (NaN too)
                seen[name] = None
            else:
                running.append(name)
        # a prompt chunk is bound by arithmetic: a couple of copies are enough
        used = 2 if m == PROMPT_ROWS else copies
        passes: dict[str, list[float]] = {name: [] for name in running}
        for turn in range(repeats + 1):  # the first warms up, and is not counted
            spent = dict.fromkeys(running, 0.0)
            for i in range(used):
                for name in running:
                    start = time.perf_counter()
                    layouts[name][i](x, kinds[name].variants[name])
                    spent[name] += time.perf_counter() - start
                fastest = min(spent[r] for r in running)
                for name in [r for r in running if spent[r] > SLOW * fastest + SLACK]:
                    passes[name].append(spent[name] / (i + 1))  # out: timed no further
                    running.remove(name)
            if turn:
                for name in running:
                    passes[name].append(spent[name] / used)
        for name, times in passes.items():
            seen[name] = min(times) * n / timed_n * 1e3
        timed = {name: ms for name, ms in seen.items() if ms is not None}
        dropped |= {name for name, ms in timed.items() if ms > DROP * min(timed.values())}
        if not timed:
            raise RuntimeError(f"no kernel computes a {dtype} {k}x{n} product correctly here")
        by_rows[m] = min(timed, key=timed.get)
        timings[m] = seen
    return RowChoice(by_rows, timings)


def fixed(dtype: str, mode: str, rows: tuple[int, ...] = ROW_CLASSES) -> RowChoice:
    """`--kernels ours|torch`: one candidate for every class, unmeasured. Ours falls back to
    torch's where ours does not run here."""
    names = matmul.candidates(dtype)
    theirs = next(name for name in ("fbgemm", "onednn", "torch") if name in names)
    ours = [name for name in names if name.startswith("ours")]
    name = ours[0] if mode == "ours" and ours else theirs
    return RowChoice({m: name for m in rows})


def machine_key(threads: int) -> str:
    """What a measured choice holds for: this CPU model (its name and, as VMs often name
    every Xeon "Intel(R) Xeon(R) Processor", its family and model numbers) and ISA under its
    caps, the thread count, torch's version and our kernels' build (the C module and the
    candidates' code)."""
    cpu = hardware.cpu_info()
    model = (f"{cpu.get('model name', 'unknown CPU')} (family {cpu.get('cpu family', '?')} "
             f"model {cpu.get('model', '?')})")
    caps = " ".join(f"{k}={v}" for k, v in sorted(hardware.isa_caps().items()))
    build = hashlib.sha256()
    for module in (kernels._kernels, matmul, kernels):
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
    head = [(d, config.vocab_size, True)]
    head_dtype = head_dtype or dtype
    model_bytes = (config.n_layer * sum(k * n for k, n, _ in layers) * BYTES[dtype]
                   + d * config.vocab_size * BYTES[head_dtype])
    if head_dtype == dtype:
        return choose(dtype, layers + head, mode, threads, model_bytes)
    tables = (choose(dtype, layers, mode, threads, model_bytes),
              choose(head_dtype, head, mode, threads, model_bytes))
    return KernelTable(mode, {key: choice for t in tables for key, choice in t.choices.items()},
                       sum(t.seconds for t in tables), sum(t.cached for t in tables))


def choose(dtype: str, shapes: list[tuple[int, int, bool]], mode: str = "auto",
           threads: int | None = None, model_bytes: float = math.inf) -> KernelTable:
    """The table for these shapes. `auto` measures what the cache does not hold, on a
    thread of its own with the engine's `threads` (an OpenMP team left on the loading thread
    slowed every later step of the engine's; the measuring thread's team ends with it). The
    head's classes stop at 32 rows: a prompt's pass multiplies only its last rows by it.
    `model_bytes`: all the model's weights (see WORKING_SET)."""
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
        missing = []
        for (k, n), rows in classes.items():
            entry = known.get(_shape_key(dtype, k, n))
            if entry and set(map(int, entry["by_rows"])) == set(rows):
                result[(dtype, k, n)] = RowChoice(
                    {int(m): name for m, name in entry["by_rows"].items()},
                    {int(m): t for m, t in entry["timings"].items()})
                cached += 1
            else:
                missing.append((k, n, rows))
        if missing:
            def run() -> None:
                torch.set_num_threads(threads)
                for k, n, rows in missing:
                    result[(dtype, k, n)] = measure(dtype, k, n, rows,
                                                    model_bytes=model_bytes)
            failure: list[BaseException] = []
            worker = threading.Thread(target=lambda: _capture(run, failure),
                                      name="gpt2serve-kernel-choice")
            worker.start()
            worker.join()
            if failure:
                raise failure[0]
            for k, n, rows in missing:
                choice = result[(dtype, k, n)]
                fresh[_shape_key(dtype, k, n)] = {"by_rows": choice.by_rows,
                                                  "timings": choice.timings}
            _write_cache(path, key, fresh)
    return KernelTable(mode, result, time.perf_counter() - start, cached)


def _capture(run, failure: list[BaseException]) -> None:
    try:
        run()
    except BaseException as e:  # re-raised on the loading thread
        failure.append(e)
