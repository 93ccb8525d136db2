"""OpenVINO GenAI as a peer of bench/offline.py. Runs in the python of a separate venv that has
openvino, openvino-genai and optimum-intel (docs/openvino-and-isa.md says how to make it);
offline.py starts it once per setting with `--openvino-python PATH`, prompts on stdin.

The model is the benchmark's Hugging Face folder exported once by optimum-intel
(`optimum-cli export openvino --task text-generation-with-past --weight-format fp32|int8`,
cached beside the others) and fed token ids (`TokenizedInputs`), so no tokenizer is in the
timing. Properties (INFERENCE_PRECISION_HINT, KV_CACHE_PRECISION,
DYNAMIC_QUANTIZATION_GROUP_SIZE, ...) go to the CPU plugin as given; the ones left out are
reported as the plugin resolves them on this host. Prints one `RESULT {json}` line.

    PYTHON bench/openvino_runner.py --hf-folder DIR --weights int8 --properties '{}' < prompts.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from common import NEW_TOKENS, converted, median_time

REPORTED = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE")


def export(hf_folder: Path, weights: str) -> Path:
    out = converted(hf_folder, "ov-", f"-{weights}")
    if not (out / "openvino_model.xml").exists():
        cli = Path(sys.executable).parent / "optimum-cli"
        # int4's groups: its default of 128 inputs, or the most that divide a width it must
        # (NNCF refuses 128 on 1.5B's 1600 and asks for a group that divides it: 64)
        width = json.loads((hf_folder / "config.json").read_text())["n_embd"]
        group = (["--group-size", str(math.gcd(128, width))]
                 if weights == "int4" and width % 128 else [])
        subprocess.run([str(cli), "export", "openvino", "-m", str(hf_folder), "--task",
                        "text-generation-with-past", "--weight-format", weights, *group,
                        str(out)], check=True, capture_output=True)
    return out


def generation_config(mode: dict):
    import openvino_genai as ov_genai

    cfg = ov_genai.GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    ignore_eos=True)
    cfg.do_sample = mode.get("do_sample", True)
    if cfg.do_sample:
        cfg.temperature = mode.get("temperature", 1.0)
        cfg.top_k = mode.get("top_k", 0)
        cfg.top_p = mode.get("top_p", 1.0)
        cfg.rng_seed = 0
    return cfg


def tokenized(batch: list[list[int]]):
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    ids = np.array(batch, dtype=np.int64)
    return ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))


def resolved_properties(given: dict) -> dict:
    """What each reported property is in this run: as given, else the plugin's default here
    (ISA-dependent: bf16 inference where the CPU has AVX512_BF16, unless capped)."""
    import openvino as ov

    core = ov.Core()
    out = {}
    for key in REPORTED:
        if key in given:
            out[key] = str(given[key])
        else:  # the plugin's default; a compiled model may still settle on another
            value = core.get_property("CPU", key)
            out[key] = f"{getattr(value, 'get_type_name', lambda: value)()} (default)"
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    out["OPTIMIZATION_CAPABILITIES"] = " ".join(caps)
    return out


def greedy_agreement(hf_folder: Path, pipe, prompt: list[int]) -> str:
    """How many of the first NEW_TOKENS greedy tokens equal transformers' for one prompt."""
    import torch
    from transformers import GPT2LMHeadModel

    ours = list(pipe.generate(tokenized([prompt]), generation_config({"do_sample": False}))
                .tokens[0])
    model = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = ref[0, len(prompt):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
    return f"{same}/{len(ref)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-folder", type=Path, required=True)
    p.add_argument("--weights", choices=["fp32", "int8", "int4"], required=True)
    p.add_argument("--properties", default="{}", help="CPU plugin properties, JSON")
    p.add_argument("--mode", default='{"do_sample": false}', help="sampling, as offline.MODES")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-greedy", action="store_true",
                   help="after timing, compare greedy tokens with transformers for one prompt")
    args = p.parse_args()
    try:
        import openvino  # noqa: F401
        import openvino_genai as ov_genai
    except ImportError as e:
        print("RESULT " + json.dumps({"skipped": f"{e} in {sys.executable}"}))
        return
    # by batch size: a batch for the warm-up and for each repeat (offline.distinct_batches)
    prompts = {int(b): batches for b, batches in json.load(sys.stdin).items()}
    properties = json.loads(args.properties)
    if args.threads:
        properties.setdefault("INFERENCE_NUM_THREADS", args.threads)
    folder = export(args.hf_folder, args.weights)
    pipe = ov_genai.LLMPipeline(str(folder), "CPU", **properties)
    cfg = generation_config(json.loads(args.mode))

    def run(batch):
        out = pipe.generate(tokenized(batch), cfg)
        assert all(len(t) == NEW_TOKENS for t in out.tokens), [len(t) for t in out.tokens]

    tok_s = {}
    for b, batches in prompts.items():
        calls = iter(batches)
        tok_s[b] = b * NEW_TOKENS / median_time(lambda: run(next(calls)), args.repeats)
    resolved = resolved_properties(properties)
    weight_bytes = (folder / "openvino_model.bin").stat().st_size
    if args.weights == "fp32" and resolved["INFERENCE_PRECISION_HINT"].startswith("bf16"):
        weight_bytes //= 2  # fp32 weights are held and read as bf16 under a bf16 hint
    result = {"tok_s": tok_s, "weight_bytes": weight_bytes,
              "isa": "OpenVINO " + json.dumps(resolved),
              "version": f"openvino-genai {ov_genai.__version__}"}
    if args.check_greedy:
        result["greedy_vs_transformers"] = greedy_agreement(args.hf_folder, pipe,
                                                            prompts[min(prompts)][0][0])
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
