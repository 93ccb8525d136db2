"""The fixed-shape decode steps that engine/cuda_graphs.py captures as CUDA graphs, run
uncaptured on CPU (capture=False): padded batches and spans give each row the logits and the
cache writes of an ordinary decode step, padding rows write to their scratch block only, and
the engine's branch for them generates what the eager engine does. The capture itself needs a
GPU: bench/gpu.py checks it there (greedy generations identical to transformers, decode
time)."""

import pytest
import torch

from conftest import filled_cache, make_hf_model, mixed_arrivals, run_engine
from gpt2serve import checkpoint
from gpt2serve.engine import Engine, EngineConfig, Prompt
from gpt2serve.engine.cuda_graphs import DecodeGraphs
from gpt2serve.model import KVCache
from gpt2serve.sampling import SamplingError, SamplingParams
from gpt2serve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("graphs") / "m", n_positions=256, seed=5)


@pytest.fixture(scope="module")
def model(folder):
    return checkpoint.load(folder)[0]


@pytest.mark.parametrize("lengths", [[5, 30, 17], [120], [3, 200, 64, 9, 1]])
def test_padded_fixed_shape_step_matches_an_ordinary_decode_step(model, lengths):
    cache, tables, spare, tokens = filled_cache(model, lengths)
    scratch = spare[0]
    expected_cache = KVCache(model.config, cache.num_blocks, cache.block_size, torch.float32,
                             "cpu")
    expected_cache.kv.copy_(cache.kv)
    before = cache.kv.clone()
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    pos = torch.tensor(lengths)
    expected = model.decode_step(tokens, pos, expected_cache, padded)

    graphs = DecodeGraphs(model, cache, max_batch_size=8, context=256, scratch_block=scratch,
                          capture=False)
    got = graphs.run(tokens.tolist(), lengths, tables)

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The same slots written, with the same keys and values (to rounding: on CPU the ordinary
    # step attends in our C kernel, the fixed-shape one through torch's ops).
    others = [b for b in range(cache.num_blocks) if b != scratch]
    written, expected_written = (c.kv[:, :, :, others] != before[:, :, :, others]
                                 for c in (cache, expected_cache))
    assert expected_written.any() and torch.equal(written, expected_written)
    torch.testing.assert_close(cache.kv[:, :, :, others], expected_cache.kv[:, :, :, others],
                               atol=1e-5, rtol=0)
    padding_rows = next(b for b in graphs.batch_sizes if b >= len(lengths)) - len(lengths)
    written = bool(cache.kv[:, :, :, scratch].abs().sum() > 0)
    assert written == (padding_rows > 0)


def test_shapes_are_bucketed(model):
    cache, tables, spare, tokens = filled_cache(model, [5, 100, 7])
    graphs = DecodeGraphs(model, cache, max_batch_size=6, context=256, scratch_block=spare[0],
                          capture=False)
    assert graphs.batch_sizes == [1, 2, 4, 6]
    assert graphs.spans == [64, 128, 256]
    assert graphs.run(tokens.tolist(), [5, 100, 7], tables).shape == (3, model.config.vocab_size)


def test_engine_with_fixed_shape_steps_generates_what_the_eager_engine_does(model, folder):
    """The engine's graphed branch (run uncaptured on CPU): prompts arriving while others
    decode, ragged lengths, siblings (n > 1), greedy and seeded sampling; and the scratch
    block is never handed to a sequence."""
    tokenizer = Tokenizer.from_dir(folder)
    arrivals = mixed_arrivals(model.config.vocab_size)
    _, eager = run_engine(model, tokenizer, arrivals, runner="eager")
    engine, fixed = run_engine(model, tokenizer, arrivals, runner="cuda-graphs")
    assert engine.runner.name == "cuda-graphs" and fixed == eager
    assert not engine.scheduler.blocks._free[engine.runner.graphs.scratch]


def test_a_request_needing_the_scratch_block_is_refused_not_left_waiting(model, folder):
    """With graphs the cache has one block fewer for sequences: a request that needs every
    block of the cache gets the 400 error at once rather than waiting for the block forever."""
    block_bytes = KVCache.block_bytes(model.config, 16, torch.float32)
    engine = Engine(model, Tokenizer.from_dir(folder),
                    EngineConfig(max_batch_size=4, kv_cache_memory=20 * block_bytes),
                    runner="cuda-graphs")
    assert engine.cache.num_blocks == 20 and engine.runner.name == "cuda-graphs"
    # Two sequences of 8 + 153 - 1 = 160 positions: 10 blocks each, sharing none.
    params = SamplingParams.from_dict({"max_new_tokens": 153, "n": 2})
    with pytest.raises(SamplingError, match="holds 304"):
        engine.check(Prompt(list(range(8)), params))
    engine.check(Prompt(list(range(8)), SamplingParams.from_dict({"max_new_tokens": 137,
                                                                  "n": 2})))
