"""int8 quality gate, teacher-forced over a fixed text: top-1 agreement with fp32 on the
trained demo model, relative logit error ||int8 - fp32|| / ||fp32|| on the random-weight
benchmark model (its logits are nearly flat, so argmax agreement means little there).

    python bench/quality.py
"""

from __future__ import annotations

import torch

from common import SHARED, gpt2_124m

from gpt2serve import checkpoint
from gpt2serve.model import KVCache


def logits(folder, quantize, ids):
    model, _ = checkpoint.load(folder, quantize=quantize)
    cache, blocks = KVCache.for_sequences(model.config, 1, len(ids), torch.float32, "cpu")
    return model.prefill(torch.tensor(ids), cache, blocks[0], all_logits=True)


def main() -> None:
    text = (SHARED / "tinyshakespeare.txt").read_text()[-20_000:]  # the demo's held-out tail
    for name, folder in (("demo model", None), ("GPT-2 124M random", gpt2_124m())):
        model, tokenizer = checkpoint.load(folder)
        n = model.config.n_positions
        ids = tokenizer.encode(text)
        agree, errors = [], []
        for start in range(0, min(len(ids) - n, 4 * n), n):
            window = ids[start:start + n]
            fp32, int8 = logits(folder, None, window), logits(folder, "int8", window)
            agree.append((fp32.argmax(-1) == int8.argmax(-1)).float().mean().item())
            errors.append(((int8 - fp32).norm() / fp32.norm()).item())
        print(f"{name}: {len(agree) * n} tokens teacher-forced, int8 top-1 agreement "
              f"{sum(agree) / len(agree):.1%}, relative logit error "
              f"{sum(errors) / len(errors):.2%}")


if __name__ == "__main__":
    main()
