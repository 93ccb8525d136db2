"""GPU checks on one CUDA device, our engine and transformers on the same models in one run:

- fidelity: our network in float32, float16 and bfloat16 against transformers'
  GPT2LMHeadModel in float32 on the GPU (prompt and decode-step logits, greedy generations),
  and the share of positions whose top-1 token agrees with float32 (transformers in the same
  dtype alongside, as the yardstick for what half precision allows);
- GPT-2 1.5B (the gpt2-xl shape, random weights, written in float16): load time and GPU
  memory, ours and transformers';
- decode: milliseconds per step at each batch size for 124M and 1.5B, ours (steps replayed as
  CUDA graphs, and eager) and transformers `generate`, against the floor of reading the
  weights once at the measured copy bandwidth.

    python bench/gpu.py [--dtype float16] [--batches 1 8 32] [--out bench/results/gpu.json]

A step's time is (time for 16 + STEPS new tokens - time for 16) / STEPS, so the prompt's read
is not in it. Models: the embedded demo model (trained), GPT-2 124M with random weights, and
the 1.5B shape with random weights; the 124M and 1.5B use the real GPT-2 vocabulary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from common import CACHE, ROOT, SHARED, gpt2_124m, prompts

STEPS = 64  # decode steps timed, after 16 that absorb the prompt


def copy_bandwidth() -> float:
    """Bytes/s the GPU moves in a device-to-device copy (read + write counted)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.nbytes / statistics.median(times[1:])


def gpt2_xl_fp16(folder: Path = CACHE / "gpt2-xl-random-fp16") -> Path:
    """The gpt2-xl shape with random weights (N(0, 0.02), LayerNorms at 1, biases 0), written
    in float16 as a Hugging Face folder: 3.1 GB, made on the GPU in seconds."""
    if (folder / "model.safetensors").exists():
        return folder
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=1600, n_layer=48, n_head=25)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT2LMHeadModel(config).state_dict().items()
                  if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    gen = torch.Generator("cuda").manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("bias"):
            t = torch.zeros(shape, dtype=torch.float16, device="cuda")
        elif ".ln_" in name:
            t = torch.ones(shape, dtype=torch.float16, device="cuda")
        else:
            t = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16) * 0.02
        state[name] = t.cpu()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config.dtype = "float16"
    config.to_json_file(folder / "config.json")
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((SHARED / "gpt2-tokenizer" / name).read_bytes())
    return folder


def token_windows(folder: Path, count: int, length: int) -> torch.Tensor:
    from gpt2serve.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(folder).encode((SHARED / "tinyshakespeare.txt").read_text()[:60_000])
    stride = (len(ids) - length) // count
    return torch.tensor([ids[i * stride: i * stride + length] for i in range(count)])


def ours_logits(model, ids: torch.Tensor, decoded: int) -> torch.Tensor:
    """Logits [N, T, V] at every position: the first T - decoded tokens read as a prompt,
    the rest one decode step at a time, through a paged cache as the engine does."""
    from gpt2serve.model import KVCache

    N, T = ids.shape
    cache, blocks = KVCache.for_sequences(model.config, N, T, next(model.parameters()).dtype,
                                          ids.device, block_size=16)
    blocks = blocks.flip(1)  # out of order, as a paged cache hands them out
    prompt = T - decoded
    out = [model.prefill(ids[:, :prompt], cache, blocks, all_logits=True)]
    for t in range(prompt, T):
        pos = torch.full((N,), t, device=ids.device)
        out.append(model.decode_step(ids[:, t], pos, cache, blocks)[:, None])
    return torch.cat(out, dim=1).float()


def fidelity(name: str, folder: Path, length: int) -> dict:
    from transformers import GPT2LMHeadModel

    from gpt2serve import checkpoint

    ids = token_windows(folder, 4, length).cuda()
    decoded = 16
    with torch.inference_mode():
        ref = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).cuda().eval()
        expected = ref(ids).logits.float()
        ref_top1 = expected.argmax(-1)
        row = {"model": name, "positions": ids.numel(), "decode_steps_checked": decoded}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model, _ = checkpoint.load(folder, dtype=dtype, device="cuda")
            got = ours_logits(model, ids, decoded)
            key = str(dtype).removeprefix("torch.")
            scale = expected.abs().max().item()
            row[key] = {
                "max_abs_logit_diff": round((got - expected).abs().max().item(), 5),
                "max_abs_logit": round(scale, 3),
                "top1_agreement_with_hf_fp32": round(
                    (got.argmax(-1) == ref_top1).float().mean().item(), 4),
            }
            if dtype != torch.float32:
                half = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).cuda().eval()
                hf_half = half(ids).logits.float()
                del half
                row[key]["hf_same_dtype_top1_agreement"] = round(
                    (hf_half.argmax(-1) == ref_top1).float().mean().item(), 4)
                row[key]["hf_same_dtype_max_abs_logit_diff"] = round(
                    (hf_half - expected).abs().max().item(), 5)
            row[key]["greedy_identical_to_hf_fp32"] = greedy_match(model, folder, ref, ids)
            del model
    print(json.dumps(row), flush=True)
    return row


def greedy_match(model, folder: Path, ref, ids: torch.Tensor) -> str:
    """Our engine's greedy tokens against `generate` (float32), 4 prompts x 48 tokens:
    'k/4' prompts identical, and the first differing step of the others."""
    from gpt2serve.engine import Engine, EngineConfig, Prompt
    from gpt2serve.sampling import SamplingParams
    from gpt2serve.tokenizer import Tokenizer

    prompts_ = ids[:, :16]
    new = 48
    engine = Engine(model, Tokenizer.from_dir(folder),
                    EngineConfig(max_batch_size=4, max_model_len=16 + new))
    params = SamplingParams.from_dict({"do_sample": False, "max_new_tokens": new,
                                       "ignore_eos": True})
    try:
        done = asyncio.run(engine.complete([Prompt(p.tolist(), params) for p in prompts_]))
    finally:
        engine.stop()
    expected = ref.generate(prompts_, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            pad_token_id=0)[:, 16:].tolist()
    same, first_diff = 0, []
    for (c,), e in zip(done, expected):
        if c.token_ids == e:
            same += 1
        else:
            first_diff.append(next(i for i, (a, b) in enumerate(zip(c.token_ids, e)) if a != b))
    return f"{same}/{len(expected)}" + (f" (first differences at steps {first_diff})"
                                        if first_diff else "")


def ms_per_step(generate, batch: list[list[int]], repeats: int) -> float:
    """Median over `repeats` of (time for 16 + STEPS tokens - time for 16) / STEPS, in ms."""
    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(batch, n)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    generate(batch, 16 + STEPS)  # warm-up
    diffs = [timed(16 + STEPS) - timed(16) for _ in range(repeats)]
    return statistics.median(diffs) / STEPS * 1e3


def ours_generator(model, tokenizer, max_batch: int, cuda_graphs: bool):
    from gpt2serve.engine import Engine, EngineConfig, Prompt
    from gpt2serve.sampling import SamplingParams

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max_batch,
                                                   max_model_len=16 + 16 + STEPS),
                    runner="cuda-graphs" if cuda_graphs else "eager")

    def generate(batch, n):
        params = SamplingParams.from_dict({"do_sample": False, "max_new_tokens": n,
                                           "ignore_eos": True})
        for (c,) in asyncio.run(engine.complete([Prompt(p, params) for p in batch])):
            assert len(c.token_ids) == n
    return engine, generate


def hf_generator(ref):
    def generate(batch, n):
        ids = torch.tensor(batch, device="cuda")
        with torch.inference_mode():
            out = ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
    return generate


def decode(name: str, folder: Path, dtype: torch.dtype, batches: list[int], bandwidth: float,
           repeats: int) -> dict:
    from transformers import GPT2LMHeadModel

    from gpt2serve import checkpoint

    batch_prompts = prompts(max(batches))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model, tokenizer = checkpoint.load(folder, dtype=dtype, device="cuda")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights = model.weight_bytes()
    row = {"model": name, "dtype": str(dtype).removeprefix("torch."),
           "weight_bytes": weights, "ours_load_s": round(load_s, 2),
           "ours_gpu_memory_after_load_gib": round((torch.cuda.memory_allocated() - base)
                                                   / 2**30, 3),
           "ours_gpu_peak_while_loading_gib": round((torch.cuda.max_memory_allocated() - base)
                                                    / 2**30, 3),
           "floor_ms_per_step": round(weights / bandwidth * 1e3, 4), "batches": {}}
    for key, graphs in (("ours_ms", True), ("ours_eager_ms", False)):
        engine, ours = ours_generator(model, tokenizer, max(batches), graphs)
        try:
            for b in batches:
                row["batches"].setdefault(b, {})[key] = round(
                    ms_per_step(ours, batch_prompts[:b], repeats), 3)
        finally:
            engine.stop()
        del engine, ours
    del model
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    ref = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).cuda().eval()
    torch.cuda.synchronize()
    row["hf_load_s"] = round(time.perf_counter() - t0, 2)
    hf = hf_generator(ref)
    for b in batches:
        cell = row["batches"][b]
        cell["hf_ms"] = round(ms_per_step(hf, batch_prompts[:b], repeats), 3)
        cell["hf_over_ours"] = round(cell["hf_ms"] / cell["ours_ms"], 2)
        cell["eager_over_graphs"] = round(cell["ours_eager_ms"] / cell["ours_ms"], 2)
        cell["floor_over_ours"] = round(row["floor_ms_per_step"] / cell["ours_ms"], 3)
    del ref
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", nargs="+", default=["fidelity", "decode"],
                   choices=["fidelity", "decode"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    bandwidth = copy_bandwidth()
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1)}
    print(json.dumps(header), flush=True)
    results: dict = {"header": header, "fidelity": [], "decode": []}
    from gpt2serve.checkpoint import DEMO_MODEL_DIR

    small = gpt2_124m()
    dtype = getattr(torch, args.dtype)
    jobs = []
    if "fidelity" in args.sections:
        jobs += [("fidelity", lambda: fidelity("demo (trained, 4 layers)", DEMO_MODEL_DIR, 256)),
                 ("fidelity", lambda: fidelity("gpt2 124M random", small, 512))]
    if "decode" in args.sections:
        jobs += [("decode", lambda: decode("gpt2 124M random", small, dtype, args.batches,
                                           bandwidth, args.repeats)),
                 ("decode", lambda: decode("gpt2 1.5B random", gpt2_xl_fp16(), dtype,
                                           args.batches, bandwidth, args.repeats))]
    for section, job in jobs:
        try:  # one failure reported, the other checks still run
            results[section].append(job())
        except Exception:
            traceback.print_exc()
            results[section].append({"error": traceback.format_exc(limit=3)})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
