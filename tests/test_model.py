"""Fidelity: our network against transformers' GPT2LMHeadModel on random-weight checkpoints."""

import asyncio

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import make_hf_model
from gpt2serve import checkpoint
from gpt2serve.engine import Engine, EngineConfig, Prompt
from gpt2serve.model import GPTConfig, Group, KVCache, inference
from gpt2serve.sampling import SamplingParams

CONFIGS = {
    "base": {},
    "deeper": dict(n_layer=4, n_head=8, n_embd=128),
    "variants": dict(n_inner=96, activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
                     layer_norm_epsilon=1e-6),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = make_hf_model(tmp_path_factory.mktemp(request.param) / "m", seed=len(request.param),
                           **CONFIGS[request.param])
    ours, tokenizer = checkpoint.load(folder)
    ref = GPT2LMHeadModel.from_pretrained(folder).eval()
    return ours, tokenizer, ref


def test_prefill_and_every_decode_step_match_transformers(pair):
    ours, _, ref = pair
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (40,))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    cache, blocks = KVCache.for_sequences(ours.config, 1, 64, torch.float32, "cpu", block_size=8)
    blocks = blocks.flip(1)  # blocks out of order, as a paged cache hands them out
    prompt = 24
    got = ours.prefill(ids[:prompt], cache, blocks[0], all_logits=True)
    torch.testing.assert_close(got, expected[:prompt], atol=1e-4, rtol=0)
    for t in range(prompt, len(ids)):
        step = ours.decode_step(ids[t:t + 1], torch.tensor([t]), cache, blocks)
        torch.testing.assert_close(step[0], expected[t], atol=1e-4, rtol=0)


@pytest.fixture(params=["one call", "query blocks of 3"])
def query_blocks(request, monkeypatch):
    """Whether a chunk's rows attend in one call or in blocks (Group.QUERY_BLOCK, 128: these
    models' chunks are shorter, so the blocks are made small to be taken)."""
    if request.param != "one call":
        monkeypatch.setattr(Group, "QUERY_BLOCK", 3)
    return request.param


def test_chunked_prefill_matches_one_pass(pair, query_blocks):
    """A prompt read in chunks at growing offsets (two prompts side by side, ragged) caches
    and predicts what one pass over it does."""
    ours, _, ref = pair
    torch.manual_seed(4)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,)) for n in (23, 9)]
    cache, blocks = KVCache.for_sequences(ours.config, 2, 64, torch.float32, "cpu", block_size=4)
    chunk, last = 5, [None, None]
    for start in range(0, 23, chunk):
        rows = [r for r, p in enumerate(prompts) if start < len(p)]
        pieces = [prompts[r][start:start + chunk] for r in rows]
        tokens = torch.zeros(len(rows), max(map(len, pieces)), dtype=torch.long)
        for i, piece in enumerate(pieces):
            tokens[i, :len(piece)] = piece
        out = ours.prefill(tokens, cache, blocks[rows], torch.tensor([start] * len(rows)),
                           torch.tensor([len(p) for p in pieces]))
        for i, r in enumerate(rows):
            last[r] = out[i]
    nxt = torch.tensor([7, 8])
    step = ours.decode_step(nxt, torch.tensor([len(p) for p in prompts]), cache, blocks)
    for r, p in enumerate(prompts):
        with torch.no_grad():
            expected = ref(torch.cat([p, nxt[r:r + 1]])[None]).logits[0]
        torch.testing.assert_close(last[r], expected[-2], atol=1e-4, rtol=0)
        torch.testing.assert_close(step[r], expected[-1], atol=1e-4, rtol=0)


def test_ragged_batch_decode_matches_each_sequence_alone(pair):
    """Three sequences of different lengths decoded together give each one's own logits."""
    ours, _, ref = pair
    torch.manual_seed(2)
    seqs = [torch.randint(0, ours.config.vocab_size, (n,)) for n in (5, 17, 11)]
    cache, blocks = KVCache.for_sequences(ours.config, 3, 64, torch.float32, "cpu")
    for slot, s in enumerate(seqs):
        ours.prefill(s[:-1], cache, blocks[slot])
    logits = ours.decode_step(torch.stack([s[-1] for s in seqs]),
                              torch.tensor([len(s) - 1 for s in seqs]), cache, blocks)
    for row, s in zip(logits, seqs):
        with torch.no_grad():
            expected = ref(s[None]).logits[0, -1]
        torch.testing.assert_close(row, expected, atol=1e-4, rtol=0)


def test_a_batch_may_gather_more_blocks_than_the_cache_holds(pair):
    """Block tables are padded to the batch's longest, so a long prompt beside short ones
    gathers rows x widest blocks, more than a small cache has: each still gets its logits."""
    ours, _, ref = pair
    torch.manual_seed(6)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,)) for n in (16, 3, 2)]
    cache = KVCache(ours.config, 6, 4, torch.float32, "cpu")  # 4 + 1 + 1 blocks
    tables = torch.tensor([[0, 1, 2, 3], [4, 0, 0, 0], [5, 0, 0, 0]])
    tokens = torch.zeros(3, 16, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    last = ours.prefill(tokens, cache, tables, lengths=torch.tensor([len(p) for p in prompts]))
    for row, p in zip(last, prompts):
        with torch.no_grad():
            expected = ref(p[None]).logits[0, -1]
        torch.testing.assert_close(row, expected, atol=1e-4, rtol=0)


def test_greedy_generation_is_token_for_token_identical(pair):
    ours, tokenizer, ref = pair
    engine = Engine(ours, tokenizer, EngineConfig(max_batch_size=4))
    prompts = [[3, 17, 42, 5], [100, 7], [9, 9, 9, 9, 9, 9, 9, 1]]
    # min_length blocks EOS as transformers' min_new_tokens does
    calls = [Prompt(p, SamplingParams.from_dict({"do_sample": False, "max_new_tokens": 64,
                                                 "min_length": len(p) + 64}))
             for p in prompts]
    try:
        results = asyncio.run(engine.complete(calls))
    finally:
        engine.stop()
    for prompt, (completion,) in zip(prompts, results):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert completion.token_ids == expected
        assert completion.finish_reason == "length"


def test_generation_stops_at_the_models_end_of_text_as_transformers_does(tmp_path):
    """generation_config.json's eos_token_id over config.json's (0, the tokenizer's
    <|endoftext|> too): transformers' generate stops where the model says, and so do we."""
    import json

    folder = make_hf_model(tmp_path / "m", seed=4)
    prompt, greedy = [3, 17, 42, 5], {"max_new_tokens": 24, "do_sample": False}
    free = GPT2LMHeadModel.from_pretrained(folder).eval().generate(
        torch.tensor([prompt]), min_new_tokens=24, pad_token_id=0, **greedy)[0, 4:].tolist()
    eos = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i] and t != 0)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    expected = GPT2LMHeadModel.from_pretrained(folder).eval().generate(
        torch.tensor([prompt]), pad_token_id=0, **greedy)[0, 4:].tolist()
    assert expected == free[:free.index(eos) + 1]
    model, tokenizer = checkpoint.load(folder)
    assert tokenizer.eos_id == 0 and model.config.eos_token_id == eos
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=2))
    try:
        [(completion,)] = asyncio.run(engine.complete([Prompt(
            prompt, SamplingParams.from_dict(greedy))]))
    finally:
        engine.stop()
    assert completion.token_ids + [eos] == expected and completion.finish_reason == "stop"


def test_batched_prefill_of_ragged_prompts_matches_each_alone(pair, query_blocks):
    """Right-padded prompts prefilled in one pass: each row's last-token logits and its cache
    (checked by a decode step) are those of the prompt alone."""
    ours, _, ref = pair
    torch.manual_seed(3)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,)) for n in (7, 19, 1, 12)]
    lengths = torch.tensor([len(p) for p in prompts])
    padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    cache, blocks = KVCache.for_sequences(ours.config, 4, 64, torch.float32, "cpu")
    last = ours.prefill(padded, cache, blocks, lengths=lengths)
    nxt = torch.tensor([5, 6, 7, 8])
    step = ours.decode_step(nxt, lengths, cache, blocks)
    for row, p in enumerate(prompts):
        with torch.no_grad():
            expected = ref(torch.cat([p, nxt[row:row + 1]])[None]).logits[0]
        torch.testing.assert_close(last[row], expected[-2], atol=1e-4, rtol=0)
        torch.testing.assert_close(step[row], expected[-1], atol=1e-4, rtol=0)


def test_a_query_block_attends_as_far_as_its_last_row_reaches(monkeypatch):
    """Two rows of a 7-token chunk, from positions 10 and 2 (the second 5 tokens long, then
    padding), in blocks of 3 rows: each block reaches the furthest of its rows' positions."""
    monkeypatch.setattr(Group, "QUERY_BLOCK", 3)
    cache, blocks = KVCache.for_sequences(GPTConfig(n_layer=1, n_head=1, n_embd=4), 2, 32,
                                          torch.float32, "cpu", block_size=4)
    g = Group(cache, torch.zeros(2, 7, dtype=torch.long), torch.tensor([10, 2]), blocks,
              torch.tensor([7, 5]))
    assert g.query_blocks == [(0, 3, 13), (3, 6, 16), (6, 7, 17)]


def test_inference_runs_in_inference_mode_whatever_the_caller():
    """The engine's calls (the plan's pass, the sampler, the model's) enter inference mode
    only where the caller is not in it: from a caller outside it, or one that turned it off,
    they still make inference tensors, never an autograd graph."""

    @inference
    def double(x):
        return x * 2, torch.is_inference_mode_enabled()

    w = torch.ones(3, requires_grad=True)
    for mode in (None, True, False):
        if mode is None:
            y, inside = double(w)
        else:
            with torch.inference_mode(mode):
                y, inside = double(w)
        assert inside and y.is_inference() and not y.requires_grad
