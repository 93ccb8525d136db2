"""The benchmark model and prompts, shared by every benchmark here.

Model: GPT-2 124M architecture (or 1.5B's, `gpt2_random`) with random weights (seeded) and the
real GPT-2 vocabulary from `../shared/data/gpt2-tokenizer/`, saved as a Hugging Face folder that
every peer can read.
Prompts: 16-token windows of tiny Shakespeare. Generation: fixed length, end-of-text ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; BENCH_SHARED_DATA names another copy (a machine the
# checkout was copied to without it).
SHARED = Path(os.environ.get("BENCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = ROOT / "bench" / "results" / "cache"
PROMPT_TOKENS, NEW_TOKENS = 16, 64


# The benchmark models: GPT-2's shapes (GPT2Config's keywords) with seeded random weights.
SHAPES = {"124m": {}, "1.5b": {"n_embd": 1600, "n_layer": 48, "n_head": 25}}
SHAPE_NAMES = {"124m": "GPT-2 124M", "1.5b": "GPT-2 1.5B"}
FOLDERS = {"124m": "gpt2-124m-random", "1.5b": "gpt2-xl-random"}


def gpt2_random(shape: str = "124m") -> Path:
    """Write a benchmark model once (124M: about 500 MB, 1.5B: 6.2 GB) and reuse it."""
    folder = CACHE / FOLDERS[shape]
    if (folder / "model.safetensors").exists() and (folder / "merges.txt").exists():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**SHAPES[shape])).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]  # llama.cpp's converter reads n_ctx
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("vocab.json", "merges.txt"):  # last: without them the folder is not done
        shutil.copy(SHARED / "gpt2-tokenizer" / name, folder / name)
    return folder


def gpt2_124m() -> Path:
    return gpt2_random("124m")


def converted(folder: Path, prefix: str = "", suffix: str = "") -> Path:
    """Where a peer's conversion of the model in `folder` is cached: gpt2-124m-random's
    under the name gpt2-124m, with the peer's prefix and suffix."""
    return CACHE / f"{prefix}{folder.name.removesuffix('-random')}{suffix}"


# llama.cpp's quantized types, quantized from its f32 GGUF by llama_model_quantize, as its
# `llama-quantize` tool does, with its default rules (for q4_0 and q4_K_M the output matrix,
# GPT-2's tied embedding, stays at 6 bits)
LLAMA_QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                   "q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def llama_cpp_gguf(folder: Path, ftype: str) -> Path:
    """A GGUF of the HF model in `folder` (written once under bench/results/cache): f32 by
    llama.cpp's converter (LLAMA_CPP_CONVERT: the sdist's
    vendor/llama.cpp/convert_hf_to_gguf.py), the LLAMA_QUANTIZED types from that one."""
    import subprocess
    import sys

    gguf = converted(folder, suffix=f"-{ftype}.gguf")
    if gguf.exists():
        return gguf
    if ftype in LLAMA_QUANTIZED:
        import llama_cpp

        source = llama_cpp_gguf(folder, "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[ftype])
        params.nthread = os.cpu_count() or 1
        partial = gguf.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params):
            raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")
        partial.rename(gguf)
        return gguf
    script = os.environ.get("LLAMA_CPP_CONVERT")
    if not script:
        raise ImportError("set LLAMA_CPP_CONVERT to llama.cpp's convert_hf_to_gguf.py")
    here = Path(script).parent  # the script imports `conversion` and `gguf` beside it
    env = {**os.environ, "PYTHONPATH": f"{here / 'gguf-py'}{os.pathsep}{here}"}
    subprocess.run([sys.executable, script, str(folder), "--outfile", str(gguf),
                    "--outtype", ftype], check=True, capture_output=True, env=env)
    return gguf


def prompts(count: int, tokens: int = PROMPT_TOKENS) -> list[list[int]]:
    """`count` prompts of exactly `tokens` GPT-2 tokens from tiny Shakespeare."""
    from gpt2serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(SHARED / "gpt2-tokenizer")
    ids = tok.encode((SHARED / "tinyshakespeare.txt").read_text()[:200_000])
    stride = (len(ids) - tokens) // count
    return [ids[i * stride: i * stride + tokens] for i in range(count)]


def distinct_batches(size: int, calls: int,
                     tokens: int = PROMPT_TOKENS) -> list[list[list[int]]]:
    """`calls` batches of `size` prompts of `tokens` tokens, no prompt in two of them: an engine
    that keeps the KV of a prompt it has read (our prefix cache) skips reading it again, and
    the peers re-read theirs, so timing one batch over and over compares unlike work."""
    every = prompts(size * calls, tokens)
    return [every[i * size:(i + 1) * size] for i in range(calls)]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_isa(engine_env: dict | None = None) -> str:
    """The CPU's vector ISA (hardware.host_isa: CPUID flags, before any cap), torch's dispatch
    level in this process, and the ISA caps the engines run under: those of `engine_env` (the
    environment given to engine processes) or else of this process."""
    import torch

    from gpt2serve import hardware

    line = f"ISA {hardware.host_isa()} (torch kernels {torch.backends.cpu.get_cpu_capability()})"
    caps = hardware.isa_caps(os.environ if engine_env is None else engine_env)
    if caps:
        line += "; engines capped: " + " ".join(f"{k}={v}" for k, v in caps.items())
    return line


def read_bandwidth() -> float:
    """Bytes/s this machine reads from memory: a sum over a buffer far larger than caches
    (four times the last-level cache, at least 256 MiB: some Xeons have 260 MiB of L3).
    Summed on a thread of its own, whose OpenMP team ends with it: a team kept by the
    caller's thread slowed every step of an engine's step thread in the same process for
    good (with more threads than CPUs, libgomp stops spinning between parallel regions;
    bench/multimodel.py's in-process engines made 790-920 tok/s against 1,280-1,550)."""
    import threading

    import torch

    from gpt2serve.hardware import last_level_cache

    measured: list = []

    def run() -> None:
        try:
            buf = torch.ones(max(256 * 2**20, 4 * last_level_cache()) // 4)
            measured.append(buf.nbytes / median_time(lambda: buf.sum(), 5))
        except BaseException as e:  # raised again on the caller's thread
            measured.append(e)
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if isinstance(measured[0], BaseException):
        raise measured[0]
    return measured[0]


# CPU generations that VMs often hide behind a bare name ("Intel(R) Xeon(R) Processor",
# "AMD EPYC"): the generation decides the memory system and the ISA, so the ledger names it.
# Intel by family 6 model; AMD by family, and family 25 by model (Zen 4: Genoa 0x10-0x1f,
# Raphael and Phoenix 0x60-0x7f, Bergamo and Siena 0xa0-0xaf; the rest Zen 3).
INTEL_XEONS = {85: "Skylake/Cascade Lake", 106: "Ice Lake", 108: "Ice Lake",
               143: "Sapphire Rapids", 207: "Emerald Rapids", 173: "Granite Rapids"}
AMD_EPYCS = {23: "Zen/Zen 2", 25: "Zen 3", 26: "Zen 5"}
ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xa0, 0xb0))


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (or the platform's word for it), with the
    generation added where the name is a bare "Intel(R) Xeon(R) Processor" or "AMD EPYC" (the
    family and model numbers where the generation is not known here)."""
    import platform

    from gpt2serve.hardware import cpu_info

    fields = cpu_info()
    name = fields.get("model name") or platform.processor() or platform.machine()
    family = int(fields.get("cpu family", "0") or 0)
    model = int(fields.get("model", "0") or 0)
    if name == "Intel(R) Xeon(R) Processor":
        name += (f" ({INTEL_XEONS[model]}; model {model})" if model in INTEL_XEONS
                 else f" (family {family} model {model})")
    elif name == "AMD EPYC" and family in AMD_EPYCS:
        zen4 = family == 25 and any(model in models for models in ZEN4_MODELS)
        name += f" ({'Zen 4' if zen4 else AMD_EPYCS[family]}; family {family} model {model})"
    return name


def machine(bandwidth: float | None = None, engine_env: dict | None = None) -> dict:
    """What a result was measured on: the fields every table of docs/benchmarks.md names."""
    import torch

    from gpt2serve import hardware

    caps = hardware.isa_caps(os.environ if engine_env is None else engine_env)
    out = {"cpu": cpu_model(), "isa": hardware.host_isa(),
           "cap": " ".join(f"{k}={v}" for k, v in caps.items()) or "none",
           "torch_kernels": torch.backends.cpu.get_cpu_capability(),
           "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    if bandwidth is not None:
        out["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def versions(**peers: str) -> dict:
    """Python, torch, transformers and gpt2serve's versions, and any peer's given."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "kserve", "gpt2serve"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {**out, **peers}


def from_root(argv: list[str], cwd: Path) -> list[str]:
    """A benchmark's arguments as given in `cwd`, as they would be given in the repository
    root: a path under the root is written from it, and a relative path (one that names
    something in `cwd`, or a file to write in a folder there) from the root too, so that
    `--out results/x.json` given in bench/ is recorded as `--out bench/results/x.json`."""
    out = []
    for arg in argv:
        here = cwd / arg  # (an absolute arg is itself)
        if arg.startswith("-") or os.sep not in arg or not (here.exists()
                                                             or here.parent.is_dir()):
            out.append(arg)  # an option, a name, or no path here
            continue
        rooted = os.path.relpath(os.path.abspath(here), ROOT)
        # (an absolute path outside the checkout stays as it was)
        out.append(arg if os.path.isabs(arg) and rooted.startswith("..") else rooted)
    return out


def write_result(path: Path, data: dict, machine_info: dict, peer_versions: dict | None = None
                 ) -> None:
    """One benchmark's JSON under bench/results/: the command that made it (as run from the
    repository root), the machine, the versions and the figures; bench/report.py turns it
    into a table of docs/benchmarks.md."""
    import shlex
    import sys

    script = Path(sys.argv[0]).resolve()
    where = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = from_root(sys.argv[1:], Path.cwd())
    result = {"command": shlex.join(["python", str(where), *argv]), "machine": machine_info,
              "versions": versions(**(peer_versions or {})), **data}
    path.write_text(json.dumps(result, indent=2) + "\n")
    if path.resolve().parent == LEDGER.parent:  # the standard runs, not a scratch --out
        append_ledger(result)


# bench/results/ledger.csv: every offline and serving run's figures, one line per engine and
# batch (offline) or concurrency (serving), under the run's date, commit and machine. It is
# committed: docs/benchmarks.md shows the latest run of each machine class from it, so a
# regression on a class nobody is on stays in view (bench/report.py).
LEDGER = ROOT / "bench" / "results" / "ledger.csv"
LEDGER_FIELDS = ("date", "commit", "benchmark", "sampling", "cpu", "isa", "cap", "threads",
                 "bandwidth_gb_s", "engine", "batch", "tok_s")


def commit_measured() -> str:
    """The commit whose code a run measures, read as the run starts (a commit made during an
    hour's run is not what it measured), "+dirty" where the engine's or the bench's tracked
    files differ from it."""
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, text=True, capture_output=True)
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("diff", "--quiet", "HEAD", "--", "src", "bench/*.py").returncode == 1
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


COMMIT = commit_measured()


def machine_class(row: dict) -> str:
    """The class a ledger row was measured on: CPU model, ISA, and the cap if any."""
    cap = "" if row["cap"] in ("", "none", "native") else ", capped at AVX2"
    return f"{row['cpu']} ({row['isa']}{cap})"


def append_ledger(result: dict, ledger: Path = LEDGER) -> None:
    """The ledger's lines for one result (offline: `tok_s` by engine and batch; serving:
    `levels` by server and concurrency, as batch); other benchmarks add none."""
    import csv
    import datetime

    if "tok_s" in result:
        figures = [(engine, int(batch), tok_s) for engine, by_batch in result["tok_s"].items()
                   for batch, tok_s in by_batch.items()]
    elif "levels" in result:
        figures = [(server, level["concurrency"], level["tok_s"])
                   for server, levels in result["levels"].items() for level in levels]
    else:
        return
    m = result["machine"]
    # a serving run's workload: its rows compare with runs of as many new tokens a request
    workload = result.get("sampling") or (f"greedy, {result['new_tokens']} new tokens"
                                          if "levels" in result else "")
    if result.get("prompt_tokens", PROMPT_TOKENS) != PROMPT_TOKENS:  # not the standard run's
        workload += f", {result['prompt_tokens']}-token prompts"
    if result.get("shape", "124m") != "124m":
        workload += f", {SHAPE_NAMES[result['shape']]}"
    run = {"date": datetime.date.today().isoformat(), "commit": COMMIT,
           "benchmark": result.get("benchmark", ""), "sampling": workload,
           "cpu": m["cpu"], "isa": m["isa"], "cap": result.get("isa_cap", m.get("cap", "")),
           "threads": m.get("threads", ""), "bandwidth_gb_s": m.get("read_bandwidth_gb_s", "")}
    new = not ledger.exists()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a", newline="") as f:
        writer = csv.DictWriter(f, LEDGER_FIELDS)
        if new:
            writer.writeheader()
        for engine, batch, tok_s in figures:
            writer.writerow({**run, "engine": engine, "batch": batch,
                             "tok_s": round(tok_s, 1)})
