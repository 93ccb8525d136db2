"""Runners: each switch (--enforce_eager, --quantize, GPT2SERVE_C_KERNELS) maps to one, named
in the log; and the sampling dispatch: a batched pass that fails is retried row by row with
the uniform numbers its rows had already drawn, so only the failing row fails and its
neighbours' tokens are the ones they would have drawn anyway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import torch

from gpt2serve import checkpoint, kernels
from gpt2serve.engine import Engine, EngineConfig
from gpt2serve.engine.runner import EagerRunner, StepOutput
from gpt2serve.engine.sampler import Sampler
from gpt2serve.engine.sequence import Prompt, Request
from gpt2serve.model import KVCache
from gpt2serve.sampling import SamplingParams


def sequence(tokenizer, params: dict):
    request = Request(Prompt([1, 2, 3], SamplingParams.from_dict(params)), 0, 8,
                      asyncio.Queue(), None)
    (seq,) = request.start(tokenizer, 0)
    return seq


def test_a_failed_batched_pass_fails_only_its_bad_row_and_changes_no_other_draw():
    model, tokenizer = checkpoint.load(None)
    vocab = model.config.vocab_size
    cache = KVCache(model.config, 4, 16, torch.float32, "cpu")
    runner = EagerRunner(model, cache, Sampler(vocab, 0, torch.device("cpu")))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    params = [{"temperature": 1.0, "top_k": 0, "seed": 5},
              {"temperature": 1.0, "repetition_penalty": 1.3, "seed": 6},
              {"temperature": 0.7, "top_k": 40, "seed": 7}]

    def run(corrupt: bool) -> StepOutput:
        rows = [sequence(tokenizer, p) for p in params]
        if corrupt:  # a state that makes the batched pass raise (a bug's stand-in)
            rows[1].seen = torch.zeros(vocab + 1, dtype=torch.bool)
        out = StepOutput()
        runner.sample(logits, rows, out)
        return out

    clean, broken = run(False), run(True)
    assert [s.index for s in broken.rows] == [0, 0]  # (each row is its request's first)
    assert len(broken.failed) == 1 and broken.failed[0][0].params.repetition_penalty == 1.3
    assert [s.token for s in broken.sampled] == [clean.sampled[0].token, clean.sampled[2].token]


def test_each_switch_maps_to_one_runner_which_the_log_names():
    fp32, tokenizer = checkpoint.load(None)
    int8, _ = checkpoint.load(None, quantize="int8")
    int4, _ = checkpoint.load(None, quantize="int4")
    config = EngineConfig(max_batch_size=2)
    fastest = "plan" if kernels.ENABLED else "eager"  # (our attention kernel)
    assert Engine(fp32, tokenizer, config, threaded=False).runner.name == fastest
    eager = EngineConfig(max_batch_size=2, enforce_eager=True)
    assert Engine(fp32, tokenizer, eager, threaded=False).runner.name == "eager"
    # the differential tests' reference says it is not the eager runner the server picks
    reference = Engine(fp32, tokenizer, config, threaded=False, runner="eager-torch-attention")
    assert "attention by torch's ops" in reference.runner.describe()
    assert Engine(int8, tokenizer, config, threaded=False).runner.name == fastest
    assert Engine(int4, tokenizer, config, threaded=False).runner.name == fastest
    for env, runner in (({}, fastest), ({"GPT2SERVE_C_KERNELS": "0"}, "eager")):
        done = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "generate", "ROMEO:",
                               "--max-new-tokens", "2"], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"runner: {runner} (" in done.stderr
