"""Offline generation speed: our engine vs transformers `generate` vs CTranslate2, same model,
same prompts, same run. Prints median tokens/s at batch 1 and 8 and the ratios to ours.

    python bench/offline.py [--repeats 3] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import torch

from common import NEW_TOKENS, ROOT, gpt2_124m, median_time, prompts


def ours(folder: Path):
    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine
    from gpt2serve.sampling import SamplingParams

    model, tokenizer = checkpoint.load(folder)
    engine = Engine(model, tokenizer, max_batch_size=8, max_len=PROMPT_MAX)
    params = SamplingParams.from_dict({"do_sample": False, "max_new_tokens": NEW_TOKENS,
                                       "ignore_eos": True})

    def run(batch):
        async def go():
            return await asyncio.gather(*(engine.complete(p, params) for p in batch))
        for (c,) in asyncio.run(go()):
            assert len(c.token_ids) == NEW_TOKENS
    return run


def hf_generate(folder: Path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()

    def run(batch):
        with torch.inference_mode():
            out = model.generate(torch.tensor(batch), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(batch[0]) + NEW_TOKENS
    return run


def ctranslate2_runner(folder: Path, compute_type: str):
    import ctranslate2

    out = ROOT / "bench" / "results" / "cache" / "ct2-gpt2-124m"
    if not (out / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(folder)).convert(str(out), force=True)
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type,
                                      intra_threads=torch.get_num_threads())
    vocab = json.loads((folder / "vocab.json").read_text())
    token_of = {i: t for t, i in vocab.items()}

    def run(batch):
        tokens = [[token_of[i] for i in p] for p in batch]
        results = generator.generate_batch(tokens, max_length=NEW_TOKENS, min_length=NEW_TOKENS,
                                           sampling_topk=1, include_prompt_in_result=False)
        assert all(len(r.sequences_ids[0]) == NEW_TOKENS for r in results)
    return run


PROMPT_MAX = 16 + NEW_TOKENS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--only", nargs="*", default=None, help="subset of runner names")
    args = p.parse_args()
    folder = gpt2_124m()
    runners = {
        "gpt2serve fp32": lambda: ours(folder),
        "transformers fp32": lambda: hf_generate(folder),
        "ctranslate2 fp32": lambda: ctranslate2_runner(folder, "float32"),
        "ctranslate2 int8": lambda: ctranslate2_runner(folder, "int8"),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus; GPT-2 124M fp32 random weights, 16-token prompts, "
          f"{NEW_TOKENS} new tokens, median of {args.repeats}")
    results: dict[str, dict[int, float]] = {}
    for name, make in runners.items():
        if args.only and name not in args.only:
            continue
        try:
            run = make()
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        results[name] = {}
        for b in args.batches:
            batch = prompts(b)
            t = median_time(lambda: run(batch), args.repeats)
            results[name][b] = b * NEW_TOKENS / t
            print(f"{name:24s} batch {b}: {results[name][b]:7.1f} tok/s", flush=True)
        del run
    base = results.get("gpt2serve fp32", {})
    print("\nratios (gpt2serve fp32 / peer):")
    for name, by_batch in results.items():
        cells = [f"batch {b}: {base[b] / v:.2f}x" for b, v in by_batch.items() if b in base]
        print(f"  vs {name:22s} " + "  ".join(cells))
    out = ROOT / "bench" / "results" / "offline.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
