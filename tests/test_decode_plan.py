"""Decode steps replayed as a plan of kernel calls (engine/decode_plan.py): the same logits and
cache writes as an eager decode step, to the bit, whatever batch sizes follow one another, for
fp32 and int8 weights with our kernels and with torch's; the engine's planned branch generates
what the eager engine does; and models whose layers are not fused get no plan."""

import pytest
import torch

from conftest import filled_cache, make_hf_model, mixed_arrivals, run_engine
from gpt2serve import checkpoint, kernels
from gpt2serve.engine.decode_plan import DecodePlan
from gpt2serve.model import KVCache
from gpt2serve.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not kernels.F32_RUNS,
                                reason="needs our C kernels (AVX2, built, enabled)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 3 layers, and scaled attention per layer: each layer's calls are bound to its own scale
    return make_hf_model(tmp_path_factory.mktemp("plan") / "m", n_positions=256, n_layer=3,
                         scale_attn_by_inverse_layer_idx=True, seed=9)


@pytest.fixture(scope="module", params=[(w, k) for k in ("ours", "torch")
                                        for w in ("fp32", "int8", "int4")], ids="-".join)
def model(folder, request):
    weights, kernels_ = request.param
    return checkpoint.load(folder, quantize=weights if weights != "fp32" else None,
                           kernels=kernels_)[0]


def eager_step(model, cache, tables, lengths, tokens):
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return model.decode_step(tokens, torch.tensor(lengths), cache, padded,
                             in_place=kernels.runs_decode_attention(cache.kv, torch.float32))


def test_a_planned_step_is_the_eager_step_to_the_bit(model):
    """Batches of 3, 1, then 3 rows again (its calls reused): each step's logits, from its
    hidden states and from the head's call bound in the plan, and the whole cache afterwards
    equal the eager step's, from the same cache."""
    plan_cache, tables, _, _ = filled_cache(model, [5, 130, 17])
    eager_cache = KVCache(model.config, plan_cache.num_blocks, plan_cache.block_size,
                          torch.float32, "cpu")
    eager_cache.kv.copy_(plan_cache.kv)
    plan = DecodePlan(model, plan_cache, max_batch_size=4, context=256)
    lengths = [5, 130, 17]
    for rows in ([0, 1, 2], [1], [0, 1, 2]):
        tokens = torch.randint(0, model.config.vocab_size, (len(rows),))
        picked = [tables[r] for r in rows]
        at = [lengths[r] for r in rows]
        expected = eager_step(model, eager_cache, picked, at, tokens)
        hidden = plan.run(tokens.tolist(), at, picked)
        assert torch.equal(model.logits(hidden), expected)
        assert torch.equal(plan.logits(len(rows)), expected)  # the head's bound call
        assert torch.equal(plan_cache.kv, eager_cache.kv)
        for r in rows:
            lengths[r] += 1
    assert sorted(plan._calls) == [1, 3]


def test_between_layers_runs_after_each_layer(model):
    cache, tables, _, tokens = filled_cache(model, [9])
    plan = DecodePlan(model, cache, max_batch_size=1, context=256)
    calls = []
    plan.run(tokens.tolist(), [9], tables, lambda: calls.append(1))
    assert len(calls) == model.config.n_layer


def test_engine_with_a_plan_generates_what_the_eager_engine_does(model, folder):
    """Prompts arriving while others decode (read between the plan's layers), ragged lengths,
    siblings, greedy and seeded sampling."""
    if "fbgemm" in (model.h[0].attn.c_attn.matmul.choice.pick(1),
                    model.head.matmul.choice.pick(1)):  # (int4's head is int8)
        pytest.skip("fbgemm quantizes a pass's rows together: a sequence's tokens depend on "
                    "the batches that timing forms (tests/engine/test_differential.py)")
    tokenizer = Tokenizer.from_dir(folder)
    arrivals = mixed_arrivals(model.config.vocab_size)
    eager_engine, eager = run_engine(model, tokenizer, arrivals, runner="eager")
    engine, planned = run_engine(model, tokenizer, arrivals)
    assert (eager_engine.runner.name, engine.runner.name) == ("eager", "plan")
    assert planned == eager
    assert engine.runner.plan._calls  # (which batch sizes ran depends on timing: the
    # differential test, tests/engine, fixes its schedules)


def test_only_models_with_fused_layers_get_a_plan(tmp_path):
    """GELU's tanh form is what the fused layers apply; another activation runs eagerly."""
    relu_folder = make_hf_model(tmp_path / "relu", activation_function="relu")
    relu, relu_tokenizer = checkpoint.load(relu_folder)
    engine, _ = run_engine(relu, relu_tokenizer, [])
    assert engine.runner.name == "eager"
