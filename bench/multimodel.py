"""Many models in one server: a repository of 20 GPT-2 124M-shape folders (random weights,
each distinct) under a 4 GiB memory budget.

  cycle     requests cycle over all 20 models (each load past the budget unloads the least
            recently used): errors, whether each model answers its own greedy text every time,
            and the cold load time of a model (gpt2serve_model_load_seconds);
  hot       16 clients on one model, then 16 clients spread over 4 loaded models, in the same
            run: tok/s and the ratio;
  fair      time to first token of a lone request to model B, alone and while model A serves
            16 streams;
  engines   (in process) four engines on one step thread: tok/s of one model with 16 streams,
            four models with 4 each, one model with 4 (what a step at batch 4 costs);
  loops     (in process) the same fairness and throughput with one step thread
            for both models (what the server does) and with one engine thread per model, the
            cores split between them.

    python bench/multimodel.py [--models 20] [--budget 4GiB] [--duration 30]
                               [--parts cycle hot fair engines loops] [--quantize int4]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import shutil
import statistics
import sys
import time

import httpx

from common import CACHE, SHARED, gpt2_124m, host_isa, prompts, read_bandwidth
from serving import openai_stream, run_level, session, start

PORT = 8411
URL = f"http://127.0.0.1:{PORT}"


def repository(count: int):
    """`count` folders of GPT-2 124M's shape, each its own seeded random weights."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = gpt2_124m()
    root = CACHE / f"repository-{count}"
    with safe_open(base / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for i in range(count):
        folder = root / f"gpt2-{i:02d}"
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
            else:
                t = torch.randn(shape, generator=g) * 0.02
            tensors[name] = t.contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        for name in ("config.json", "vocab.json", "merges.txt"):
            shutil.copy(base / name, folder / name)
    return root


def metric_values(name: str) -> dict[str, float]:
    """model -> value of a per-model series on the server's /metrics."""
    out = {}
    for line in httpx.get(f"{URL}/metrics").text.splitlines():
        m = re.match(rf'^{name}\{{.*model="([^"]+)".*\}} ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def greedy(client, model: str, prompt: str) -> str:
    r = await client.post(f"{URL}/v1/models/{model}:predict", json={"instances": [{
        "prompt": prompt, "max_new_tokens": 8, "temperature": 0, "ignore_eos": True}]})
    r.raise_for_status()
    return r.json()["predictions"][0]


async def cycle(names: list[str], passes: int, prompt: str) -> dict:
    """Each request loads its model (the budget holds 5 of the 20), after unloading the least
    recently used. Its latency is the load, the unload and 8 tokens: the first request of
    the process, and the others."""
    errors, texts, latencies = 0, {}, []
    mismatched = set()
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(passes):
            for name in names:
                t = time.perf_counter()
                try:
                    text = await greedy(client, name, prompt)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                if texts.setdefault(name, text) != text:
                    mismatched.add(name)
    loads = metric_values("gpt2serve_model_load_seconds_sum")
    counts = metric_values("gpt2serve_model_load_seconds_count")
    rest = sorted(latencies[1:])
    return {"requests": passes * len(names), "errors": errors,
            "distinct_texts": len(set(texts.values())), "models": len(names),
            "same_text_on_every_visit": not mismatched, "loads": int(sum(counts.values())),
            "load_s_mean": round(sum(loads.values()) / sum(counts.values()), 3),
            "first_request_s": round(latencies[0], 3),
            "request_s_median": round(statistics.median(rest), 3),
            "request_s_p90": round(rest[int(0.9 * (len(rest) - 1))], 3),
            "request_s_max": round(rest[-1], 3), "wall_s": round(time.perf_counter() - t0, 1)}


async def spread(models: list[str], clients: int, duration: float, tokens: int,
                 prompt_list: list[str]) -> float:
    """tok/s of `clients` streaming clients whose requests go round the `models`."""
    turn = itertools.cycle(models)

    async def call(client, url, prompt, n, _model):
        return await openai_stream(client, url, prompt, n, next(turn))

    level = await run_level(call, f"{URL}/openai/v1/completions", None, clients, duration,
                            tokens, prompt_list)
    return level.throughput


HOG_TOKENS = 200  # 16 such streams fit a 256 MiB KV cache of GPT-2 124M


async def beside_hogs(hog, probe, generated, probes: int = 8
                      ) -> tuple[list[float], list[float], float]:
    """TTFTs of `probe()` alone, then while 16 clients keep streams on the other model
    (`hog()`, each client asking again as soon as its stream ends); and the other model's
    tok/s meanwhile (`generated()`: its tokens so far)."""
    alone = [await probe() for _ in range(probes)]
    stop = asyncio.Event()

    async def client():
        while not stop.is_set():
            await hog()

    hogs = [asyncio.create_task(client()) for _ in range(16)]
    await asyncio.sleep(3.0)  # all 16 streaming
    t0, before = time.perf_counter(), await generated()
    busy = []
    for _ in range(probes):
        busy.append(await probe())
        await asyncio.sleep(0.2)
    rate = (await generated() - before) / (time.perf_counter() - t0)
    stop.set()
    await asyncio.gather(*hogs)
    return alone, busy, rate


def ttft_row(alone: list[float], busy: list[float], rate: float) -> dict:
    return {"ttft_b_alone_ms": round(1000 * statistics.median(alone), 1),
            "ttft_b_beside_16_on_a_ms": round(1000 * statistics.median(busy), 1),
            "ratio": round(statistics.median(busy) / statistics.median(alone), 2),
            "a_tok_s_meanwhile": round(rate, 1)}


async def fair(a: str, b: str, prompt_list: list[str]) -> dict:
    url = f"{URL}/openai/v1/completions"
    async with session() as client:
        async def probe():
            return (await openai_stream(client, url, prompt_list[0], 4, b))[1]

        async def hog():
            return (await openai_stream(client, url, prompt_list[1], HOG_TOKENS, a))[2]

        async def generated():
            return (await asyncio.to_thread(metric_values,
                                            "gpt2serve_generated_tokens_total")).get(a, 0.0)

        await probe()  # b loaded
        return ttft_row(*await beside_hogs(hog, probe, generated))


def compare_loops(folder, threads: int, prompt_ids: list[list[int]]) -> dict:
    """In process, two engines of the same model: model A with 16 streams, B's lone requests;
    on one shared step thread, then on one thread each with the cores split."""
    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine, EngineConfig, Prompt
    from gpt2serve.engine.step_loop import StepLoop
    from gpt2serve.sampling import SamplingParams

    long = SamplingParams.from_dict({"max_new_tokens": HOG_TOKENS, "ignore_eos": True,
                                     "temperature": 0})
    short = SamplingParams.from_dict({"max_new_tokens": 1, "temperature": 0})

    def engines(shared: bool):
        import torch
        torch.set_num_threads(1)
        loop = StepLoop(threads) if shared else None
        out = []
        for name in ("A", "B"):
            model, tok = checkpoint.load(folder)
            config = EngineConfig(max_batch_size=16, threads=threads if shared else
                                  max(1, threads // 2), kv_cache_memory=256 * 2**20)
            out.append(Engine(model, tok, config, name=name, loop=loop))
        return out

    async def measure(a, b) -> dict:
        async def probe():
            t0 = time.perf_counter()
            async for _ in b.stream(b.submit([Prompt(prompt_ids[0], short)])):
                return time.perf_counter() - t0

        async def hog():
            async for _ in a.stream(a.submit([Prompt(prompt_ids[1], long)])):
                pass

        async def generated():
            return a.metrics.tokens_generated._value.get()

        return ttft_row(*await beside_hogs(hog, probe, generated))

    results = {}
    for shared in (True, False):
        a, b = engines(shared)
        try:
            results["one step thread" if shared else "a thread per model"] = asyncio.run(
                measure(a, b))
        finally:
            a.stop()
            b.stop()
    return results


def hot_engines(folders: list, threads: int, prompt_ids: list[list[int]], tokens: int,
                quantize: str) -> dict:
    """In process, without HTTP: tok/s of one model with 16 streams, of four models with 4
    each, and of one model with 4, all on one step thread, the models quantized as the
    server's (`quantize`)."""
    import torch

    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine, EngineConfig, Prompt
    from gpt2serve.engine.step_loop import StepLoop
    from gpt2serve.sampling import SamplingParams

    torch.set_num_threads(1)
    loop = StepLoop(threads)
    config = EngineConfig(max_batch_size=16, kv_cache_memory=256 * 2**20)
    engines = [Engine(*checkpoint.load(f, quantize=None if quantize == "none" else quantize,
                                       threads=threads), config, name=f.name, loop=loop)
               for f in folders]
    params = SamplingParams.from_dict({"max_new_tokens": tokens, "ignore_eos": True,
                                       "temperature": 0})

    async def rate(chosen, streams: int) -> float:
        t0, count = time.perf_counter(), 0

        async def one(engine, first: int):
            nonlocal count
            ids = prompt_ids[first:first + streams]
            async for _ in engine.stream(engine.submit([Prompt(i, params) for i in ids])):
                count += 1

        await asyncio.gather(*(one(e, 4 * k) for k, e in enumerate(chosen)))
        return count / (time.perf_counter() - t0)

    runs = {"one model, 16 streams": (engines[:1], 16), "four models, 4 streams each":
            (engines, 4), "one model, 4 streams": (engines[:1], 4)}
    try:
        rates = {name: [asyncio.run(rate(*run)) for _ in range(3)] for name, run in runs.items()}
    finally:
        for engine in engines:
            engine.stop()
    return {name: round(statistics.median(r), 1) for name, r in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--budget", default="4GiB")
    p.add_argument("--kv", default="256MiB", help="--kv_cache_memory per model")
    p.add_argument("--passes", type=int, default=2, help="rounds of the 20-model cycle")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per throughput run")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", nargs="+", choices=["cycle", "hot", "fair", "engines", "loops"],
                   default=["cycle", "hot", "fair", "engines", "loops"])
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="the server's --quantize, and the in-process engines' of `engines`")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    root = repository(args.models)
    names = sorted(d.name for d in root.iterdir())[:args.models]
    ids = prompts(40)
    from gpt2serve.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(SHARED / "gpt2-tokenizer")
    texts = [tok.decode(i) for i in ids]
    print(f"{host_isa()}; measured read bandwidth {read_bandwidth() / 1e9:.1f} GB/s; "
          f"{args.models} GPT-2 124M-shape fp32 models (served with --quantize "
          f"{args.quantize}), budget {args.budget}, "
          f"{args.kv} KV each, {args.threads} threads", flush=True)
    results: dict = {}
    for f in root.iterdir():  # warm the page cache, as the figure asks
        (f / "model.safetensors").read_bytes()
    cmd = [sys.executable, "-m", "gpt2serve.cli", "serve", "--model_dir", str(root),
           "--http_port", str(PORT), "--enable_grpc", "false", "--memory_budget", args.budget,
           "--kv_cache_memory", args.kv, "--max_batch_size", "16", "--load_models", "none",
           "--threads", str(args.threads), "--load_timeout", "120",
           "--quantize", args.quantize]
    proc = start(cmd, f"{URL}/v2/health/ready")
    try:
        if "cycle" in args.parts:
            results["cycle"] = asyncio.run(cycle(names, args.passes, texts[0]))
            print("cycle:", json.dumps(results["cycle"]), flush=True)
        if "hot" in args.parts:
            asyncio.run(cycle(names[:4], 1, texts[0]))  # the four loaded, before timing
            one = asyncio.run(spread(names[:1], 16, args.duration, args.tokens, texts))
            four = asyncio.run(spread(names[:4], 16, args.duration, args.tokens, texts))
            one_again = asyncio.run(spread(names[:1], 16, args.duration, args.tokens, texts))
            base = statistics.mean([one, one_again])
            results["hot"] = {"one_model_tok_s": round(base, 1),
                              "four_models_tok_s": round(four, 1),
                              "ratio": round(four / base, 2)}
            print("hot:", json.dumps(results["hot"]), flush=True)
        if "fair" in args.parts:
            results["fair"] = asyncio.run(fair(names[0], names[1], texts))
            print("fair:", json.dumps(results["fair"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if "engines" in args.parts:
        results["engines"] = hot_engines([root / n for n in names[:4]], args.threads, ids,
                                         args.tokens, args.quantize)
        print("engines:", json.dumps(results["engines"]), flush=True)
    if "loops" in args.parts:
        results["loops"] = compare_loops(gpt2_124m(), args.threads, ids)
        print("loops:", json.dumps(results["loops"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
