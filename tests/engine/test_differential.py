"""Every runner this machine has against the eager reference, on random mixes of requests.

A seeded generator draws mixes that use every sampling feature (greedy, top-k, top-p,
temperature, the repetition, presence and frequency penalties, logit_bias, min_tokens, stop
strings and token ids, logprobs, echo's prompt logprobs (with no token generated too), n > 1
with seeds, long prompts read in chunks, prompts that start as earlier ones do, read from the
prefix cache, and a chat's next turns, which go on from an earlier call's answer and read the
blocks its decode steps filled) and their arrivals: the step each call arrives before, or
the layer of a step's pass it arrives after. Each mix runs on every runner with the schedule fixed (stepped.py), batched and chunked
as that schedule makes it; the reference runs each call alone on the eager runner, its prompt
read whole, nothing from the prefix cache, attending by torch's ops (REFERENCE_RUNNER). Tokens,
text and finish reasons must be the same, and log-probabilities within TOLERANCE (the runners'
arithmetic differs in summation order only), except where a sequence took another token at a
near tie, which is checked by recomputing that draw. Each kind of weights runs with our kernels
(`--kernels ours`) and with torch's (`torch`: fbgemm's int8, oneDNN's fp32), against a reference
with the same kernels. Our int8 kernel quantizes each row on its own, so int8 is held to nearly
the same (INT8_SAME: log-probabilities within INT8_TOLERANCE, tokens the same in all but a few
sequences); fbgemm's int8 quantizes a pass's rows together, so with it a sequence depends on its
batch neighbours and is held to less (INT8_AGREEMENT). int4 through our kernel quantizes each
row's groups of 32 on their own, and is held as our int8 is. On a CPU with AMX, int8 and int4
also run through our AMX forms (`--kernels amx`), which give the VNNI form's sums: each such
runner must give exactly what its VNNI twin gives on the same schedule (AMX_TWIN).

The demo model is a trained one, so its logits are far from ties: a token that differs is a bug,
not rounding. MIXES mixes (and MIXES // 4 with next turns) run in `make test`;
GPT2SERVE_DIFFERENTIAL_MIXES runs more, from seed GPT2SERVE_DIFFERENTIAL_FIRST_SEED (0).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
from dataclasses import dataclass

import pytest
import torch

from gpt2serve import checkpoint, kernel_choice, kernels, metrics
from gpt2serve.engine import Engine, EngineConfig, Prompt
from gpt2serve.engine.sampler import Sampler
from gpt2serve.model import KVCache
from gpt2serve.sampling import SamplingError, SamplingParams
from stepped import Arrival, Outcome, run_schedule

MIXES = int(os.environ.get("GPT2SERVE_DIFFERENTIAL_MIXES", 200))
FIRST = int(os.environ.get("GPT2SERVE_DIFFERENTIAL_FIRST_SEED", 0))  # (for seeds CI never ran)
TOLERANCE = 2e-3  # log-probabilities, and a near tie's margin (near_tie)
# int8 weights through fbgemm: a pass quantizes its activations with one scale for all of its
# rows, so a sequence's logits depend on its batch neighbours (0.08 at most over a decode step
# of 5 rows against 1, more beside a prompt chunk) and its tokens may too. Its mixes must run
# without errors, and most sequences give the reference's tokens (measured: about 80% of
# answers of up to 8 tokens; 65% of the chat test's up to 24, 67% capped at AVX2).
INT8_AGREEMENT = 0.6
BATCH_DEPENDENT = {"int8-torch"}
# int8 through our kernel: a summation order that differs in the last bit of an activation
# can round it to the next u8 level, a step of 1/255 of its row's range. Measured over the 200
# mixes: log-probabilities equal at the median, 4.7e-4 apart at the 99th percentile, 1.7e-2 at
# most; 3 sequences of 1040 took another token.
INT8_TOLERANCE = 5e-2
INT8_SAME = 0.99
# The reference of each kind of weights: the eager runner, attending by torch's ops on the
# gathered blocks, so that the runners' in-place attention kernels are held to them. But int8
# and int4 attend in place in their references too: a sequence's arithmetic then differs from
# the reference's only by its schedule (batch and chunks), which INT8_SAME measures. Against
# torch's attention, whose sums differ in the last bits, the u8 roundings those bits flip move
# their logits 5e-3 apart on average and a draw at a near tie with them (4% of sequences).
REFERENCE_RUNNER = {"int8": "eager", "int4": "eager"}

TEXT = """ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet
is the sun. Arise, fair sun, and kill the envious moon, who is already sick and pale with
grief, that thou her maid art far more fair than she.
JULIET: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; or, if
thou wilt not, be but sworn my love, and I'll no longer be a Capulet.
KING RICHARD III: Now is the winter of our discontent made glorious summer by this sun of
York; and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
"""

# (name, weights, runner): every runner against the reference of its weights
RUNNERS = [("eager", "fp32", "eager"), ("plan", "fp32", "plan"),
           ("plan-unscreened", "fp32", "plan-unscreened"),
           ("cuda-graphs-uncaptured", "fp32", "cuda-graphs"),
           ("torch-kernels-plan", "fp32-torch", "plan"),
           ("int8", "int8", "eager"), ("int8-plan", "int8", "plan"),
           ("int8-torch-kernels-plan", "int8-torch", "plan"),
           ("int4", "int4", "eager"), ("int4-plan", "int4", "plan"),
           ("fp16-cache-plan", "fp32-fp16-cache", "plan"),
           ("int8-amx", "int8-amx", "eager"), ("int8-amx-plan", "int8-amx", "plan"),
           ("int4-amx-plan", "int4-amx", "plan")]
# Our AMX forms (held by --kernels amx) and the VNNI form's runner whose outcomes they must
# equal bit for bit: the same sums, the same schedule. (Where the CPU lacks AMX, their weights
# are not loaded and they do not run.)
AMX_TWIN = {"int8-amx": "int8", "int8-amx-plan": "int8-plan", "int4-amx-plan": "int4-plan"}
# Weights whose engines (and reference) keep keys and values in another dtype: the fp32 model
# with --kv_cache_dtype float16, its reference the eager runner's torch ops on the same cache.
# (int8 and int4 engines hold an fp16 cache by default where our decode kernel reads it.)
CACHE_DTYPE = {"fp32-fp16-cache": "float16"}


@pytest.fixture(scope="module")
def models():
    fp32, tokenizer = checkpoint.load(None, kernels="ours")
    return {"fp32": fp32, "int8": checkpoint.load(None, quantize="int8", kernels="ours")[0],
            "fp32-torch": checkpoint.load(None, kernels="torch")[0],
            "int8-torch": checkpoint.load(None, quantize="int8", kernels="torch")[0],
            "int4": checkpoint.load(None, quantize="int4", kernels="ours")[0],
            "fp32-fp16-cache": fp32,
            **({f"{q}-amx": checkpoint.load(None, quantize=q, kernels="amx")[0]
                for q in ("int8", "int4")} if kernels.AMX else {})}, tokenizer


def draw_params(rng: random.Random, vocab: int, longest: int = 8) -> dict:
    p: dict = {"max_new_tokens": rng.randint(1, longest), "seed": rng.randrange(2**31)}
    if rng.random() < 0.3:
        p["temperature"] = 0
    else:
        p["temperature"] = rng.choice([0.6, 1.0, 1.4])
        p["top_k"] = rng.choice([0, 0, 5, 40])
        p["top_p"] = rng.choice([1.0, 1.0, 0.9, 0.6])
    if rng.random() < 0.25:
        p["repetition_penalty"] = rng.choice([1.3, 0.8])
    if rng.random() < 0.2:
        p["presence_penalty"] = rng.choice([0.5, -0.5])
    if rng.random() < 0.2:
        p["frequency_penalty"] = 0.4
    if rng.random() < 0.2:
        p["logit_bias"] = {str(rng.randrange(vocab)): rng.choice([-5.0, 5.0, 100.0])}
    if rng.random() < 0.2:
        p["min_tokens"] = min(rng.randint(1, 4), p["max_new_tokens"])  # at most, as vLLM
    if rng.random() < 0.2:
        p["stop"] = [rng.choice(["e", " the", "\n", "."])]
    if rng.random() < 0.15:
        p["stop_token_ids"] = [rng.randrange(vocab)]
    if rng.random() < 0.25:
        p["logprobs"] = rng.choice([0, 1, 3])
    if rng.random() < 0.2:
        p["n"] = rng.choice([2, 3])
    if rng.random() < 0.1:
        p["ignore_eos"] = True
    return p


def draw_mix(rng: random.Random, ids: list[int], vocab: int, longest: int = 8
             ) -> list[Arrival]:
    mix = []
    for _ in range(rng.randint(2, 6)):
        length = rng.randint(1, 24) if rng.random() < 0.7 else rng.randint(60, 180)
        start = rng.randrange(len(ids) - length)
        prompt = ids[start:start + length]
        if mix and rng.random() < 0.3:  # a prefix read before (the prefix cache's hits)
            before = rng.choice(mix).prompt.ids
            prompt = before[:rng.randint(1, len(before))] + prompt[:rng.randint(0, 24)]
        params = draw_sampling(rng, vocab, longest)
        echo = rng.choice([1, 2]) if rng.random() < 0.15 else None
        if echo and rng.random() < 0.3:  # scored, nothing generated (OpenAI's max_tokens 0)
            params = dataclasses.replace(params, max_new_tokens=0, min_tokens=0)
        layer = rng.randrange(4) if rng.random() < 0.3 else None
        mix.append(Arrival(rng.randint(0, 6), Prompt(prompt, params, prompt_logprobs=echo),
                           layer=layer, streamed=rng.random() < 0.5))
    return mix


def draw_sampling(rng: random.Random, vocab: int, longest: int) -> SamplingParams:
    raw = draw_params(rng, vocab, longest)
    try:
        return SamplingParams.from_dict(raw)
    except SamplingError:  # a combination the API refuses (e.g. greedy with n > 1)
        return SamplingParams.from_dict({**raw, "n": 1})


def draw_next_turns(rng: random.Random, mix: list[Arrival], answers: list[Outcome],
                    ids: list[int], vocab: int) -> list[tuple[Arrival, Arrival]]:
    """A chat's next turns: for some calls of `mix`, a prompt that is the call's prompt, one
    of its answers (the reference's tokens: a runner that took another token at a near tie
    just misses the cache) and a few tokens more. Each arrives while that answer is still
    being generated or after it ends, so it reads from the prefix cache the full blocks
    that the answer's decode steps have filled by then (Scheduler._remember_filled).
    Returns (first, next turn) pairs."""
    turns = []
    for first, answer in zip(mix, answers):
        if rng.random() < 0.4:
            continue
        tokens = rng.choice(answer.completions).token_ids
        start = rng.randrange(len(ids) - 8)
        prompt = first.prompt.ids + tokens + ids[start:start + rng.randint(0, 8)]
        turns.append((first, Arrival(first.step + rng.randint(1, len(tokens) + 4),
                                     Prompt(prompt, draw_sampling(rng, vocab, 8)),
                                     layer=rng.randrange(4) if rng.random() < 0.3 else None,
                                     streamed=rng.random() < 0.5)))
    return turns


def reference(engine: Engine, mix: list[Arrival]) -> list[Outcome]:
    """Each call alone, its prompt read whole."""
    return [run_schedule(engine, [Arrival(0, a.prompt)])[0] for a in mix]


@dataclass
class History:
    """A sequence as the sampler reads it (sampler.Row), rebuilt to recompute one draw."""

    params: SamplingParams
    prompt: list[int]
    tokens: list[int]
    random: None = None
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    def history(self) -> list[int]:
        return self.prompt + self.tokens


def near_tie(model, prompt: Prompt, index: int, before: list[int], got: int, want: int,
             tolerance: float) -> bool:
    """Whether the reference's draw of the token after `before` (sequence `index`) was within
    `tolerance` of giving `got` instead of `want`: for greedy rows, the two logits (after
    penalties) that close; for sampling rows, its uniform number that close (in probability
    mass) to `got`'s interval of the inverse CDF, with top-p's set as the reference cut it or
    one token wider or narrower where its mass at the cut is that close to top_p. Anything
    else is a bug, not rounding."""
    ids = prompt.ids + before
    cache, tables = KVCache.for_sequences(model.config, 1, len(ids), torch.float32, "cpu")
    raw = model.prefill(torch.tensor(ids), cache, tables[0])[None].float()
    sampler = Sampler(model.config.vocab_size, 0, torch.device("cpu"))
    row = History(prompt.params, prompt.ids, before)
    logits = sampler._penalise(raw, [row])[0]
    if prompt.params.greedy:
        return abs(float(logits[got] - logits[want])) <= tolerance * max(1, abs(float(logits[want])))
    candidates, probs = sampler.candidates(logits[None], [prompt.params])
    stream = prompt.params.streams()[index]
    for _ in range(len(before) + 1):  # a sampling row draws once per token
        u = stream.uniform()
    at = (candidates[0] == got).nonzero()
    if not len(at):
        return False
    ranked = 0 < prompt.params.top_k < model.config.vocab_size
    return any(drawn(p, int(at[0]), u, ranked, tolerance)
               for p in [probs[0], *top_p_neighbours(sampler, logits, prompt.params,
                                                      candidates[0], probs[0], tolerance)])


def drawn(probs: torch.Tensor, at: int, u: float, ranked: bool, tolerance: float) -> bool:
    """Whether uniform number `u` draws candidate `at` from these candidates' probabilities,
    within `tolerance` of probability mass. `ranked`: top-k's candidates, likeliest first."""
    if probs[at] == 0:  # (a set without it: no draw, however near, gives it)
        return False
    cdf = probs.cumsum(-1)
    x = u * float(cdf[-1])
    low, high = (float(cdf[at - 1]) if at else 0.0), float(cdf[at])
    if ranked:
        # two candidates whose probabilities are within `tolerance` of each other (relatively)
        # may rank either way round in the other run: `at`'s interval may start after as
        # little as the mass of those clearly likelier, or as much as that of all those not
        # clearly less likely
        p_got, others = float(probs[at]), torch.cat([probs[:at], probs[at + 1:]])
        low = min(low, float(others[others > p_got * (1 + tolerance)].sum()))
        high = max(high, float(others[others >= p_got * (1 - tolerance)].sum()) + p_got)
    return low - tolerance <= x <= high + tolerance


def top_p_neighbours(sampler: Sampler, logits: torch.Tensor, params: SamplingParams,
                     candidates: torch.Tensor, probs: torch.Tensor,
                     tolerance: float) -> list[torch.Tensor]:
    """Top-p's set one token narrower or wider than `probs` keeps, as the candidates'
    probabilities, where the mass of the likeliest tokens at that cut is within `tolerance`
    of top_p: another run's last-bit-different sums may cut there (seed 101897 of a long
    run: two tokens' mass 0.6000000 at top_p 0.6, kept by torch's attention, not by ours)."""
    if params.top_p >= 1.0:
        return []
    ids, whole = sampler.candidates(logits[None], [dataclasses.replace(params, top_p=1.0)])
    assert torch.equal(ids[0], candidates)  # (the same candidates, in the same order)
    whole = whole[0]
    order = whole.argsort(descending=True)
    mass = whole[order].cumsum(0)
    kept = int((probs > 0).sum())
    out = []
    for size in (kept - 1, kept + 1):
        cut = min(size, kept) - 1  # the last token both sets keep
        if 1 <= size <= len(whole) and abs(float(mass[cut]) - params.top_p) <= tolerance:
            narrower_or_wider = torch.zeros_like(whole)
            narrower_or_wider[order[:size]] = whole[order[:size]]
            out.append(narrower_or_wider / narrower_or_wider.sum())
    return out


@pytest.mark.parametrize("top_p, sizes", [(0.6, {2, 3}), (0.6 + 3e-3, {3})])
def test_top_p_s_cut_is_a_near_tie_only_within_the_tolerance(top_p, sizes):
    """The two likeliest of four tokens hold 0.6 of the mass: at top_p 0.6 a run may keep
    them alone or with the third (one set is the reference's, the other its neighbour); at
    0.603, 3e-3 past them, only the set of three is kept, and no neighbour is offered."""
    probs = torch.tensor([0.35, 0.25, 0.22, 0.18], dtype=torch.float64)
    logits = probs.log().float()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=top_p)
    sampler = Sampler(4, 0, torch.device("cpu"))
    candidates, kept = sampler.candidates(logits[None], [params])
    sets = [kept[0], *top_p_neighbours(sampler, logits, params, candidates[0], kept[0],
                                        TOLERANCE)]
    assert {int((p > 0).sum()) for p in sets} == sizes
    for p in sets:
        assert float(p.sum()) == pytest.approx(1.0) and bool((p[:int((p > 0).sum())] > 0).all())
    # the third token is drawn from the set of three by a number in its interval, never from
    # the set of two, however near the number is to that set's end
    three = next(p for p in sets if int((p > 0).sum()) == 3)
    start = float(three[:2].sum())
    assert drawn(three, 2, start + 1e-3, ranked=False, tolerance=TOLERANCE)
    if 2 in sizes:
        two = next(p for p in sets if int((p > 0).sum()) == 2)
        assert not drawn(two, 2, 1.0, ranked=False, tolerance=TOLERANCE)
        assert drawn(two, 1, 1.0, ranked=False, tolerance=TOLERANCE)


def assert_same(model, prompt: Prompt, got: Outcome, want: Outcome, where: str,
                tolerance: float) -> int:
    """The same outcome, up to where a near tie (see near_tie) made a sequence choose
    another token: from there on it is not compared. Returns how many sequences did."""
    assert got.error is None and want.error is None, (where, got.error, want.error)
    ties = 0
    for i, (g, w) in enumerate(zip(got.completions, want.completions, strict=True)):
        same = next((t for t, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b),
                    None)
        if same is not None:
            assert near_tie(model, prompt, i, w.token_ids[:same], g.token_ids[same],
                            w.token_ids[same], tolerance), f"{where}: sequence {i}, token {same}"
            ties += 1
        else:
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text,
                                                              w.finish_reason), where
            same = len(g.token_ids)
        assert len(g.logprobs) == len(w.logprobs) or same < len(g.token_ids), where
        for a, b in list(zip(g.logprobs, w.logprobs))[:same]:
            assert a == pytest.approx(b, abs=tolerance), where
        for a, b in list(zip(g.top_logprobs, w.top_logprobs))[:same]:
            assert_top_close(a, b, tolerance, where)
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs), where
    for (a, top_a), (b, top_b) in zip(got.prompt_logprobs, want.prompt_logprobs):
        assert a == pytest.approx(b, abs=tolerance), where
        assert_top_close(top_a, top_b, tolerance, where)
    return ties


def assert_top_close(got: list[tuple[int, float]], want: list[tuple[int, float]],
                     tolerance: float, where: str) -> None:
    """The same k likeliest tokens with close log-probabilities, except that tokens within
    `tolerance` of the k-th may trade places."""
    assert len(got) == len(want), where
    if not want:
        return
    g, w = dict(got), dict(want)
    cutoff = min(w.values())
    for token, value in w.items():
        if token in g:
            assert g[token] == pytest.approx(value, abs=tolerance), where
        else:
            assert value - cutoff <= tolerance, where
    for token in g.keys() - w.keys():
        assert cutoff - g[token] <= tolerance, where


def nearly_same(got: Outcome, want: Outcome, where: str) -> list[bool]:
    """For each sequence, whether it took the reference's tokens (with its text, finish
    reason, and log-probabilities within INT8_TOLERANCE); those that did not are counted."""
    assert got.error is None and want.error is None, (where, got.error, want.error)
    same = []
    for g, w in zip(got.completions, want.completions, strict=True):
        same.append(g.token_ids == w.token_ids)
        if same[-1]:
            assert (g.text, g.finish_reason) == (w.text, w.finish_reason), where
            for a, b in zip(g.logprobs, w.logprobs, strict=True):
                assert a == pytest.approx(b, abs=INT8_TOLERANCE), where
    return same


def with_cache(config: EngineConfig, weights: str) -> EngineConfig:
    """config with the weights' cache dtype, its budget (given for an fp32 cache) scaled to
    the same number of blocks in the dtype the engine will hold: int8 and int4 engines get
    the fp16 cache by default (EngineConfig.cache_dtype)."""
    config = dataclasses.replace(config, kv_cache_dtype=CACHE_DTYPE.get(weights, "auto"))
    dtype = config.cache_dtype(torch.float32, quantized=weights.startswith("int"))
    budget = config.kv_cache_memory
    if budget:
        budget = budget * dtype.itemsize // 4
    return dataclasses.replace(config, kv_cache_memory=budget)


def engines(by_weights: dict, tokenizer, config: EngineConfig) -> list[tuple[str, str, Engine]]:
    """(name, weights, engine) for each of RUNNERS this machine has."""
    out = []
    for name, weights, runner in RUNNERS:
        if weights not in by_weights:  # AMX's, where the CPU lacks it
            continue
        try:
            out.append((name, weights, Engine(by_weights[weights], tokenizer,
                                              with_cache(config, weights), runner=runner,
                                              threaded=False)))
        except ValueError as e:  # the runner declines: say so, run the others
            assert "runner cannot serve" in str(e), e
    return out


@dataclass
class Tally:
    """What the runners' outcomes were held to, counted over a test's mixes."""

    by_weights: dict
    ties: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fbgemm_same: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ours_int8_same: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def compare(self, name: str, weights: str, mix: list[Arrival], got: list[Outcome],
                want: list[Outcome], seed: int) -> None:
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            where = f"mix {seed}, runner {name}, call {i}: {mix[i]}"
            if weights in BATCH_DEPENDENT:
                assert g.error is None and w.error is None, (where, g.error, w.error)
                self.fbgemm_same.update(a.token_ids == b.token_ids
                                        for a, b in zip(g.completions, w.completions))
            elif weights in ("int8", "int4"):
                self.ours_int8_same.update(nearly_same(g, w, where))
            else:
                self.ties[name] += assert_same(self.by_weights[weights], mix[i].prompt, g, w,
                                               where, TOLERANCE)

    def check(self, mixes: int) -> None:
        print("sequences that took another token at a near tie, by runner:", dict(self.ties),
              "; int8 and int4 sequences with the reference's tokens, our kernels:",
              dict(self.ours_int8_same), "fbgemm:", dict(self.fbgemm_same))
        assert sum(self.ties.values()) <= mixes // 10  # near ties are rare in a trained model
        if self.fbgemm_same:
            assert self.fbgemm_same[True] >= INT8_AGREEMENT * sum(self.fbgemm_same.values())
        if self.ours_int8_same:
            assert self.ours_int8_same[True] >= INT8_SAME * sum(self.ours_int8_same.values())


@pytest.fixture(scope="module")
def setup(models):
    """The references (each call alone, read whole, no prefix cache) and the runners."""
    by_weights, tokenizer = models
    cold = EngineConfig(max_batch_size=3, enable_prefix_caching=False)
    references = {w: Engine(m, tokenizer, with_cache(cold, w), threaded=False,
                            runner=REFERENCE_RUNNER.get(w, "eager-torch-attention"))
                  for w, m in by_weights.items() if not w.endswith("-amx")}  # (AMX_TWIN)
    # Small chunks and blocks, and a KV budget that makes calls wait for blocks; chunks beside
    # streams of the schedule's sizes, not of measured times (stepped.py).
    config = EngineConfig(max_batch_size=8, max_prefill_tokens=32, block_size=8,
                          kv_cache_memory=160 * 8 * 2 * 4 * 256 * 4, prefill_step_stretch=0)
    runners = engines(by_weights, tokenizer, config)
    if kernels.F32_RUNS:
        assert {"plan", "plan-unscreened"} <= {name for name, _, _ in runners}
    if kernels.HALF_RUNS:  # the fp16 cache is read in place by our decode attention
        assert all(e.runner.in_place for n, _, e in runners if n == "fp16-cache-plan")
    names = [name for name, _, _ in runners]
    assert all(AMX_TWIN[n] in names for n in names if n in AMX_TWIN)
    if kernels.AMX:  # every AMX runner runs, its matmuls through the AMX forms
        assert AMX_TWIN.keys() <= set(names)
        for q in ("int8", "int4"):
            chosen = {name for module in by_weights[f"{q}-amx"].modules()
                      if hasattr(module, "matmul") for name in module.matmul.choice.names()}
            assert kernel_choice.AMX in chosen, (q, chosen)
    assert not any(e.runner.in_place or e.runner.prompt_in_place
                   for w, e in references.items() if w not in REFERENCE_RUNNER)
    return references, runners, tokenizer.encode(TEXT * 2), by_weights["fp32"].config.vocab_size


@pytest.mark.parametrize("chunk", [range(FIRST, FIRST + MIXES // 2),
                                   range(FIRST + MIXES // 2, FIRST + MIXES)],
                         ids=["first-half", "second-half"])
def test_every_runner_generates_what_the_eager_reference_does_alone(models, setup, chunk):
    references, runners, ids, vocab = setup
    tally = Tally(models[0])
    hits = metrics.PREFIX_CACHE_HITS.labels("")._value.get()
    for seed in chunk:
        mix = draw_mix(random.Random(seed), ids, vocab)
        want = {w: reference(e, mix) for w, e in references.items()}
        got = {}
        for name, weights, engine in runners:
            got[name] = run_schedule(engine, mix)
            if name in AMX_TWIN:
                assert got[name] == got[AMX_TWIN[name]], f"mix {seed}, runner {name}"
            else:
                tally.compare(name, weights, mix, got[name], want[weights], seed)
    tally.check(len(chunk))
    assert metrics.PREFIX_CACHE_HITS.labels("")._value.get() > hits  # prefixes were read from the cache


def test_a_chats_next_turn_reads_its_answers_blocks_and_generates_what_the_reference_does(
        models, setup):
    """Mixes whose calls generate up to 24 tokens (three blocks of 8), and next turns that go
    on from their answers: every runner must generate for them what the reference does
    reading them whole, and must have read some from blocks that decode steps filled."""
    references, runners, ids, vocab = setup
    tally, size = Tally(models[0]), runners[0][2].cache.block_size
    from_answers = collections.Counter()  # next turns that read a block past their first's prompt
    weights_of = {name: weights for name, weights, _ in runners}
    seeds = range(FIRST + MIXES, FIRST + MIXES + MIXES // 4)
    for seed in seeds:
        first = draw_mix(random.Random(seed), ids, vocab, longest=24)
        answers = {w: reference(e, first) for w, e in references.items()}
        turns = {w: draw_next_turns(random.Random(seed), first, answers[w], ids, vocab)
                 for w in references}
        got = {}
        for name, weights, engine in runners:
            weights = weights_of.get(AMX_TWIN.get(name), weights)  # its twin's turns
            mix = first + [turn for _, turn in turns[weights]]
            got[name] = run_schedule(engine, mix)
            if name in AMX_TWIN:
                assert got[name] == got[AMX_TWIN[name]], f"mix {seed}, runner {name}"
            else:
                want = answers[weights] + reference(references[weights],
                                                    [turn for _, turn in turns[weights]])
                tally.compare(name, weights, mix, got[name], want, seed)
            for (before, _), outcome in zip(turns[weights], got[name][len(first):]):
                from_answers[name] += outcome.cached_tokens > len(before.prompt.ids) // size * size
    tally.check(len(seeds))
    print("next turns that read blocks their answers' decode steps filled, by runner:",
          dict(from_answers))
    assert all(from_answers[name] for name, _, _ in runners), from_answers
