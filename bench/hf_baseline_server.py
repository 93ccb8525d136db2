"""The reference deployment, for comparison: a KServe custom predictor that answers V1
`:predict` one request at a time with `transformers.generate` (containerConcurrency 1).

    python bench/hf_baseline_server.py --model_dir DIR --http_port 8090
"""

from __future__ import annotations

import argparse

import kserve
import torch
from transformers import GPT2LMHeadModel


class HFBaseline(kserve.Model):
    def __init__(self, name: str, model_dir: str):
        super().__init__(name)
        # As the reference recipe loads it: float16 on a GPU, float32 on CPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.ready = True

    def predict(self, payload: dict, headers=None) -> dict:
        # Synchronous on purpose: like the reference predictor it blocks the server while it
        # generates, so requests are served strictly one after another.
        out = []
        for inst in payload["instances"]:
            ids = torch.tensor([inst["prompt"]], device=self.device)
            n = inst["max_new_tokens"]
            with torch.inference_mode():
                gen = self.model.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=0)
            out.append(gen[0, ids.shape[1]:].tolist())
        return {"predictions": out}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", required=True)
    p.add_argument("--model_name", default="aitextgen")
    p.add_argument("--http_port", type=int, default=8090)
    p.add_argument("--grpc_port", type=int, default=8091)
    a, _ = p.parse_known_args()
    kserve.ModelServer(http_port=a.http_port, grpc_port=a.grpc_port, enable_grpc=False).start(
        [HFBaseline(a.model_name, a.model_dir)])
