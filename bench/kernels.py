"""Our C kernels against the torch ops they replace, on GPT-2 124M's shapes, cache-cold.

    python bench/kernels.py [--rows 1 2 4 6 8 16] [--prompt-rows 128 512] [--repeats 20]

fp32 matmuls: the same 48 matrices and the head, kernels.linear_f32 on pack_f32's panels (in
huge pages, and the same panels copied to ordinary 4 KiB pages) vs oneDNN's inner product on
its packed weights (matmul.OneDnnF32), per number of rows:
decode batches, and prompt chunks (--prompt-rows, in GFLOP/s).

int8 matmuls: the 48 layer matrices of 12 layers and the LM head, each called once per pass as a
decode step does (so every weight comes from memory, not from cache): kernels.int8_linear vs
fbgemm's `quantized::linear_dynamic` (and ours' AMX form where it runs), per number of rows
(at load, kernel_choice.py measures these and the other candidates per matrix shape itself).
Decode attention: kernels.decode_attention vs the torch ops of
model.Block._attend (store, gather, scaled-dot-product attention), 12 layers, per batch size
and context length, and ours again on an fp16 cache (--kv_cache_dtype float16). Run it under
the AVX2 cap with `FBGEMM_ENABLE_INSTRUCTIONS=AVX2` (and the rest of hardware.AVX2_CAP_ENV)
in the environment. `--parts attention` runs only that part. Prompt attention (`--parts
prompt`, AVX-512 only): kernels.prompt_attention in place vs the torch ops of model.Block._attend
(gather, SDPA in blocks of query rows under the causal mask), per chunk of a prompt, in ms and
GFLOP/s of the causal products, on an fp32 and an fp16 cache. int4 matmuls (`--parts int4`):
each form of kernels.int4_linear this CPU runs, on GPT-2 1.5B's layer shapes.
"""

from __future__ import annotations

import argparse
import os

import torch

from common import host_isa, median_time, read_bandwidth

LAYER_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) per layer
XL_LAYER_SHAPES = [(1600, 4800), (1600, 1600), (1600, 6400), (6400, 1600)]  # GPT-2 1.5B's
HEAD = (768, 50257)


class Int8Matrix:
    """One random weight matrix, quantized as quantize.py does, in both kernels' layouts."""

    def __init__(self, k: int, n: int):
        from gpt2serve import matmul, quantize

        q, scales = quantize.quantize_rows(torch.randn(n, k) * 0.05)
        weights = (q.int_repr(), scales, torch.randn(n))
        self.ours, self.theirs = matmul.OursInt8(*weights), matmul.FbgemmInt8(*weights)
        self.k, self.n = k, n


def int8_matmuls(rows: list[int], repeats: int) -> None:
    from gpt2serve import kernel_choice, kernels, matmul

    layers = [Int8Matrix(k, n) for _ in range(12) for k, n in LAYER_SHAPES]
    head = Int8Matrix(*HEAD)
    weight_mb = sum(m.k * m.n for m in layers) / 1e6
    print(f"int8 matmuls, 12 layers ({weight_mb:.0f} MB) + LM head ({head.k * head.n / 1e6:.0f} "
          f"MB), ms per pass (median of {repeats}); ours {'VNNI' if kernels.INT8_VNNI else 'AVX2'}"
          + (", and ours on AMX's tiles" if kernels.AMX else ""))
    print(f"{'rows':>5} {'fbgemm layers':>14} {'ours layers':>12} {'fbgemm head':>12} "
          f"{'ours head':>10}  layers ours/fbgemm speed"
          + (f"  {'AMX layers':>10} {'AMX head':>9}" if kernels.AMX else ""))
    forms = {"theirs": lambda w, x: w.theirs(x), "ours": lambda w, x: w.ours(x)}
    if kernels.AMX:
        forms["amx"] = lambda w, x: w.ours(x, matmul.OursInt8.variants[kernel_choice.AMX])
    for m in rows:
        xs = {k: torch.randn(m, k) for k in (768, 3072)}
        t = {name: median_time(lambda: [form(w, xs[w.k]) for w in layers], repeats)
             for name, form in forms.items()}
        h = {name: median_time(lambda: form(head, xs[768]), repeats)
             for name, form in forms.items()}
        print(f"{m:5d} {t['theirs'] * 1e3:14.2f} {t['ours'] * 1e3:12.2f} "
              f"{h['theirs'] * 1e3:12.2f} {h['ours'] * 1e3:10.2f}  {t['theirs'] / t['ours']:.2f}x"
              f"  ({weight_mb / 1e3 / t['ours']:.1f} GB/s ours)"
              + (f"  {t['amx'] * 1e3:10.2f} {h['amx'] * 1e3:9.2f}" if "amx" in t else ""))


def int4_matmuls(rows: list[int], repeats: int) -> None:
    """Each int4 form this CPU runs (AMX, VNNI, AVX-512, AVX2: kernels.int4_linear) on the
    matrices of 4 layers of GPT-2 1.5B (the shapes where 4-bit weights matter), each called
    once per pass."""
    from gpt2serve import kernel_choice, kernels, matmul

    shapes = [shape for _ in range(4) for shape in XL_LAYER_SHAPES]
    layers = [matmul.OursInt4(*kernels.quantize_int4(torch.randn(n, k) / k ** 0.5),
                              torch.randn(n)) for k, n in shapes]
    forms = {name: matmul.OursInt4.variants[name]
             for name in matmul.candidates("int4", [matmul.OursInt4])}
    nbytes = sum(k * n for k, n in shapes) * kernel_choice.BYTES["int4"]
    print(f"\nint4 matmuls, 4 layers of GPT-2 1.5B ({nbytes / 1e6:.0f} MB), ms per pass "
          f"(median of {repeats}, fewer past 16 rows); each form over VNNI's time")
    print(f"{'rows':>5} " + " ".join(f"{name:>12}" for name in forms))
    for m in rows:
        xs = {k: torch.randn(m, k) for k in (1600, 6400)}
        t = {name: median_time(lambda: [w(xs[k], isa) for (k, _), w in zip(shapes, layers)],
                               repeats if m <= 16 else max(3, repeats // 5))
             for name, isa in forms.items()}
        base = t.get("ours-vnni")
        print(f"{m:5d} " + " ".join(
            f"{t[name] * 1e3:6.2f}" + (f" {base / t[name]:4.2f}x" if base else "")
            for name in forms))


def fp32_matmuls(rows: list[int], repeats: int) -> None:
    from gpt2serve import kernels, matmul

    shapes = [shape for _ in range(12) for shape in LAYER_SHAPES] + [HEAD]
    weights = [torch.randn(k, n) * 0.02 for k, n in shapes]
    biases = [torch.randn(n) for _, n in shapes]
    ours = [kernels.pack_f32(w) for w in weights]
    small_pages = [p.clone() for p in ours]  # torch's allocator: 4 KiB pages here
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), matmul.BATCH_HINT)
              for w in weights]
    del weights
    nbytes = sum(k * n * 4 for k, n in shapes)
    print(f"\nfp32 matmuls, 12 layers + LM head ({nbytes / 1e6:.0f} MB), ms per pass (median of "
          f"{repeats}, fewer past 16 rows); ours {('AVX2', 'AVX-512')[kernels.VECTOR_ISA - 1]}")
    print(f"{'rows':>5} {'oneDNN':>8} {'ours':>8} {'ours 4K':>8}  ours/oneDNN speed, ours GB/s "
          f"(GFLOP/s past 16 rows), huge/4K pages")
    for m in rows:
        xs = {k: torch.randn(m, k) for k in (768, 3072)}
        runs = {
            "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(xs[k], w, b, "none", [], "")
                               for (k, n), w, b in zip(shapes, onednn, biases)],
            "ours": lambda: [kernels.linear_f32(xs[k], p, b, n)
                             for (k, n), p, b in zip(shapes, ours, biases)],
            "4k": lambda: [kernels.linear_f32(xs[k], p, b, n)
                           for (k, n), p, b in zip(shapes, small_pages, biases)],
        }
        t = {name: median_time(run, repeats if m <= 16 else max(3, repeats // 5))
             for name, run in runs.items()}
        rate = (f"{nbytes / t['ours'] / 1e9:5.1f} GB/s" if m <= 16 else
                f"{2 * m * nbytes / 4 / t['ours'] / 1e9:5.0f} GFLOP/s")
        print(f"{m:5d} {t['onednn'] * 1e3:8.2f} {t['ours'] * 1e3:8.2f} {t['4k'] * 1e3:8.2f}  "
              f"{t['onednn'] / t['ours']:.2f}x  {rate}  {t['4k'] / t['ours']:.2f}x")


def decode_attention(batches: list[int], contexts: list[int], repeats: int) -> None:
    from gpt2serve import kernels
    from gpt2serve.model import Block, GPTConfig, Group, KVCache

    cfg = GPTConfig()
    block = Block(cfg, 0)  # its _attend: the torch ops, or ours for groups that allow it
    print("\ndecode attention, 12 layers of GPT-2 124M, ms per step (median of "
          f"{repeats}): torch ops (gather + SDPA) vs ours, in place, on an fp32 cache; ours "
          "on an fp16 cache")
    for n in batches:
        for context in contexts:
            qkv = torch.randn(n, 3 * cfg.n_embd)
            pos = torch.full((n,), context)
            times = {}
            for name, enabled, dtype in (("torch", False, torch.float32),
                                         ("ours", True, torch.float32),
                                         ("ours fp16", True, torch.float16)):
                kernels.ENABLED = enabled
                # a cache of each its own, as large as the context needs, written (its
                # untouched pages would all read the one zero page, from the caches)
                cache, blocks = KVCache.for_sequences(cfg, n, context + 1, dtype, "cpu")
                cache.kv.normal_()
                blocks = blocks.flatten()[torch.randperm(blocks.numel())].view(blocks.shape)
                group = Group(cache, torch.zeros(n, 1, dtype=torch.long), pos, blocks,
                              in_place=kernels.runs_decode_attention(cache.kv, torch.float32))
                if name == "ours fp16" and not group.in_place:
                    continue  # no AVX2 with F16C here
                times[name] = median_time(
                    lambda: [block._attend(qkv, kv, group) for kv in cache.kv], repeats)
            half = (f"  ours fp16 {times['ours fp16'] * 1e3:6.2f} "
                    f"({times['ours'] / times['ours fp16']:.2f}x ours fp32)"
                    if "ours fp16" in times else "")
            print(f"  batch {n:2d}, context {context:4d}: torch {times['torch'] * 1e3:6.2f}  "
                  f"ours {times['ours'] * 1e3:6.2f}  {times['torch'] / times['ours']:.2f}x"
                  + half)
    kernels.ENABLED = True


def prompt_attention(chunks: list[tuple[int, int]], repeats: int) -> None:
    from gpt2serve.model import Block, GPTConfig, Group, KVCache

    cfg = GPTConfig()
    block = Block(cfg, 0)
    print("\nprompt attention, 12 layers of GPT-2 124M, one prompt's chunk, ms (median of "
          f"{repeats}) and GFLOP/s of the causal products: torch ops (gather + SDPA in query "
          "blocks) vs ours, in place; on an fp32 and an fp16 cache")
    for start, T in chunks:
        qkv = torch.randn(T, 3 * cfg.n_embd)
        # q.k and p.v over every head: 2 x 2 FLOP a dimension, T rows, start + T / 2 positions each
        flops = 4 * cfg.n_layer * cfg.n_embd * T * (start + T / 2)
        for dtype in (torch.float32, torch.float16):
            cache, blocks = KVCache.for_sequences(cfg, 1, start + T, dtype, "cpu")
            cache.kv.normal_()
            blocks = blocks.flatten()[torch.randperm(blocks.numel())].view(blocks.shape)
            times = {}
            for name, in_place in (("torch", False), ("ours", True)):
                group = Group(cache, torch.zeros(1, T, dtype=torch.long), torch.tensor([start]),
                              blocks, in_place=in_place)
                times[name] = median_time(
                    lambda: [block._attend(qkv, kv, group) for kv in cache.kv], repeats)
            rate = {k: flops / t / 1e9 for k, t in times.items()}
            print(f"  positions {start:4d}-{start + T - 1:4d}, {str(dtype)[6:]:7s}: torch "
                  f"{times['torch'] * 1e3:6.2f} ({rate['torch']:3.0f})  ours "
                  f"{times['ours'] * 1e3:6.2f} ({rate['ours']:3.0f})  "
                  f"{times['torch'] / times['ours']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 6, 8, 16])
    p.add_argument("--prompt-rows", type=int, nargs="*", default=[128, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1000])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--parts", nargs="+",
                   choices=["fp32", "int8", "int4", "attention", "prompt"],
                   default=["fp32", "int8", "int4", "attention", "prompt"])
    args = p.parse_args()
    from gpt2serve import hardware, kernels

    if not kernels.ENABLED:
        p.error("gpt2serve._kernels is not built here (or GPT2SERVE_C_KERNELS=0)")
    torch.set_num_threads(hardware.default_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"{host_isa()}; fbgemm {hardware.fbgemm_isa()}; measured read bandwidth "
          f"{read_bandwidth() / 1e9:.1f} GB/s")
    if kernels.F32_RUNS and "fp32" in args.parts:
        fp32_matmuls(args.rows + args.prompt_rows, args.repeats)
    if kernels.INT8_RUNS and "int8" in args.parts:
        int8_matmuls(args.rows + args.prompt_rows, args.repeats)
    if kernels.INT4_ISA and "int4" in args.parts:
        int4_matmuls(args.rows + args.prompt_rows, args.repeats)
    if "attention" in args.parts:
        decode_attention(args.batches, args.contexts, args.repeats)
    if "prompt" in args.parts and kernels.runs_prompt_attention(torch.zeros(1, 64), torch.float32):
        prompt_attention([(0, 128), (0, 512), (512, 448)], args.repeats)


if __name__ == "__main__":
    main()
