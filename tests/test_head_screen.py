"""The LM head's int8 screen (packing.HeadScreen): the argmax the full fp32 head gives, ties
and near-ties included, and each row's k largest logits, or None where the screen cannot
decide; and the engine's greedy and top-k steps through it generate what the eager engine
does."""

import pytest
import torch

from conftest import make_hf_model, run_engine
from gpt2serve import checkpoint, kernel_choice, kernels, metrics
from gpt2serve.model import TiedHead
from gpt2serve.packing import HeadScreen, PackedHead, ScreenChoice
from gpt2serve.sampling import SamplingParams
from gpt2serve.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not (kernels.F32_RUNS and kernels.INT8_RUNS),
                                reason="needs our fp32 and int8 kernels (AVX2, built, enabled)")


def packed_head(weight_t: torch.Tensor, kernels_: str = "ours") -> PackedHead:
    """A PackedHead with its screen as the plan runner makes it (as `head.screen`)."""
    head = TiedHead(*weight_t.shape)
    head.weight_t.data.copy_(weight_t)
    packed = PackedHead(head, kernel_choice.choose("fp32", [(*weight_t.shape, True)], kernels_))
    packed.screen = HeadScreen.of(packed)
    return packed


def full_argmax(head: PackedHead, h: torch.Tensor) -> list[int]:
    """What the sampler takes from the full head's logits: numpy's argmax, the first on ties."""
    return head(h).numpy().argmax(1).tolist()


def screened_argmax(head: PackedHead, h: torch.Tensor) -> list[int] | None:
    """The same from the screen's logits for greedy rows."""
    logits = head.screen.logits(h, [1] * h.shape[0])
    return None if logits is None else logits.numpy().argmax(1).tolist()


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_the_screen_picks_the_full_heads_token_through_ties_and_near_ties(rows):
    """Each row's hidden state points at a head row that has a twin: equal (a tie, the twin
    before or after it) or off by less than int8 can tell apart, so that the int8 logits often
    rank the pair the wrong way round. The screen must still pick what the fp32 head picks."""
    torch.manual_seed(rows)
    D, V = 64, 1000
    weight_t = torch.randn(D, V)
    targets = torch.randperm(V)[:2 * 40].view(40, 2)
    for i, (a, b) in enumerate(targets.tolist()):
        offset = 0.0 if i % 4 == 0 else 2e-3 * (1 + i % 3)
        weight_t[:, b] = weight_t[:, a] + offset * torch.randn(D)
    head = packed_head(weight_t)
    assert head.screen is not None
    inverted = 0
    for trial in range(0, 40, rows):
        picks = targets[trial:trial + rows, 0]
        h = weight_t[:, picks].t() * 3 + 0.3 * torch.randn(len(picks), D)
        expected = full_argmax(head, h)
        assert screened_argmax(head, h) == expected
        int8 = head.screen.int8(h)
        inverted += sum(a != b for a, b in zip(int8.argmax(1).tolist(), expected))
    assert inverted >= 3  # the int8 logits alone would have picked wrongly


@pytest.mark.parametrize("normed", [False, True])
def test_the_screen_gives_each_rows_k_largest_logits_as_the_full_head_does(normed):
    """Rows wanting their 1, 7, 50 and 3 largest logits, from a head whose rows come in twins
    (equal, or off by less than int8 can tell apart) so that the k-th largest has near-ties
    beside it: each row's k largest values, and which tokens reach the k-th, are the full
    head's; every logit the screen gives is the full head's to the bit. `normed`: hidden
    states read through a layer norm, as GPT.logits gives them, which both fuse into their
    kernels' calls."""
    torch.manual_seed(4)
    D, V = 64, 8000
    weight_t = torch.randn(D, V)
    weight_t[:, 4000:] = weight_t[:, :4000] + 1e-3 * torch.randn(D, 4000) * (torch.rand(4000) > 0.3)
    head = packed_head(weight_t)
    ln = None
    if normed:
        ln = torch.nn.LayerNorm(D)
        ln.weight.data, ln.bias.data = torch.rand(D) + 0.5, torch.randn(D) / 10
    ks = [1, 7, 50, 3]
    for trial in range(5):
        h = torch.randn(len(ks), D) * (1 + trial) + trial
        with torch.inference_mode():
            full, screened = head(h, ln), head.screen.logits(h, ks, ln)
        assert screened is not None
        given = torch.isfinite(screened)
        assert torch.equal(screened[given], full[given])
        for row, k in enumerate(ks):
            top = full[row].topk(k).values
            assert torch.equal(screened[row].topk(k).values, top)
            assert torch.equal(screened[row] >= top[-1], full[row] >= top[-1])


def test_the_screen_declines_what_it_cannot_decide():
    torch.manual_seed(0)
    D, V = 32, 800
    head = packed_head(torch.randn(D, 1).expand(D, V).contiguous())  # every logit equal
    h = torch.randn(1, D)
    assert screened_argmax(head, h) is None
    assert full_argmax(head, h) == [0]
    head = packed_head(torch.randn(D, V))
    assert screened_argmax(head, torch.full((1, D), float("nan"))) is None
    for rows in (4, 8):  # any number of rows (ScreenChoice says when it pays)
        h = torch.randn(rows, D)
        assert screened_argmax(head, h) == full_argmax(head, h)


def test_the_screen_rests_after_declining_steps_in_a_row():
    """Flat logits: every greedy step declines. After REST_AFTER of them the screen sits out
    REST_STEPS greedy steps, then tries again; other ks are not affected."""
    torch.manual_seed(5)
    D, V = 32, 800
    head = packed_head(torch.randn(D, 1).expand(D, V).contiguous())
    screen, h = head.screen, torch.randn(1, D)
    for _ in range(screen.REST_AFTER):
        assert screen.promising([1])
        assert screen.logits(h, [1]) is None
    assert [screen.promising([1]) for _ in range(screen.REST_STEPS)] == [False] * screen.REST_STEPS
    assert screen.promising([5]) and screen.promising([1])


def choices(choice: ScreenChoice, m: int, k: int, seconds: dict[bool, float],
            steps: int) -> list[bool]:
    """The ways `choice` takes for `steps` steps of m rows and largest k, each taking
    seconds[way]."""
    ways = []
    for _ in range(steps):
        way = choice.screens(m, k)
        choice.observe(m, k, way, seconds[way])
        ways.append(way)
    return ways


@pytest.mark.parametrize("slow", [True, False])
def test_the_screen_choice_keeps_to_the_faster_way_beyond_a_few_rows(slow):
    """Steps of 8 rows, one way made twice as slow: after both are tried WARMUP times, the
    slow way runs only to look again, once in EXPLORE steps. Up to ALWAYS_ROWS rows the
    screen is always read, and each k is measured apart."""
    choice, C = ScreenChoice(), ScreenChoice
    ways = choices(choice, 8, 1, {slow: 2e-3, not slow: 1e-3}, 2 * C.WARMUP + 10 * C.EXPLORE)
    assert ways[:2 * C.WARMUP].count(slow) == C.WARMUP
    assert ways[2 * C.WARMUP:].count(slow) == 10
    assert all(choices(choice, C.ALWAYS_ROWS, 1, {True: 1.0, False: 1e-3}, 100))
    later = choices(choice, 8, 50, {slow: 1e-3, not slow: 2e-3}, 2 * C.WARMUP + C.EXPLORE)
    assert later[2 * C.WARMUP:].count(not slow) == 1  # k = 50 the other way round


def test_the_screen_choice_measures_k_by_powers_of_two():
    """top_k 33 to 64 share their measurements, so requests' top_k values cannot grow them:
    after steps of k = 50, steps of k = 33 need no warm-up of their own."""
    choice = ScreenChoice()
    choices(choice, 8, 50, {True: 2e-3, False: 1e-3}, 2 * ScreenChoice.WARMUP)
    assert choices(choice, 8, 33, {True: 2e-3, False: 1e-3}, 8) == [False] * 8


def test_the_screen_choice_leaves_a_way_that_turned_slow():
    """The way taken slows down (another process, other text): within half a WINDOW of
    its steps the other way, faster now, is taken."""
    choice, C = ScreenChoice(), ScreenChoice
    choices(choice, 6, 1, {True: 1e-3, False: 2e-3}, 2 * C.WARMUP + C.EXPLORE)
    ways = choices(choice, 6, 1, {True: 3e-3, False: 2e-3}, C.WINDOW)
    assert ways[C.WINDOW // 2 + 1:] == [False] * (C.WINDOW - C.WINDOW // 2 - 1)


def test_the_screen_declines_rows_the_head_multiplies_with_another_kernel():
    """Where the head's product of m rows is torch's, the screen's exact logits (our
    kernel's sums) would not be the head's to the bit, so a screened step would not give
    what a declined one does: it serves no such step."""
    torch.manual_seed(6)
    weight_t = torch.randn(32, 800)
    head, h = packed_head(weight_t, "torch"), torch.randn(2, 32)
    assert head.screen is not None and not head.screen.serves(2)
    assert head.screen.logits(h, [1, 1]) is None
    ours = packed_head(weight_t)
    assert ours.screen.serves(2) and ours.screen.logits(h, [1, 1]) is not None


def test_no_screen_for_a_head_that_is_not_finite():
    weight_t = torch.randn(16, 100)
    weight_t[3, 7] = float("inf")
    assert packed_head(weight_t).screen is None


def screened_steps() -> float:
    return metrics.HEAD_SCREEN.labels("", "decided")._value.get()  # engines named ""


def test_steps_through_the_screen_generate_what_the_eager_engine_does(tmp_path):
    """A greedy request decoding alone, seeded top-k siblings alone (every decode step
    screened), then both amid requests the screen must leave to the full head: one with a
    repetition penalty, one with min_tokens, one with top-p but no top-k. The batches these
    make depend on timing; the tokens must not."""
    folder = make_hf_model(tmp_path / "m", n_layer=2, n_embd=96, n_head=4, vocab_size=3000,
                           seed=5)
    model, tokenizer = checkpoint.load(folder)[0], Tokenizer.from_dir(folder)
    torch.manual_seed(1)
    greedy = SamplingParams.from_dict({"do_sample": False, "max_new_tokens": 24,
                                       "ignore_eos": True})
    top_k = SamplingParams.from_dict({"temperature": 0.8, "top_k": 20, "top_p": 0.9,
                                      "max_new_tokens": 24, "ignore_eos": True, "seed": 3,
                                      "n": 2})
    penalised = SamplingParams.from_dict({"do_sample": False, "max_new_tokens": 24,
                                          "repetition_penalty": 1.3})
    at_least = SamplingParams.from_dict({"do_sample": False, "max_new_tokens": 24,
                                         "min_tokens": 20})
    nucleus = SamplingParams.from_dict({"temperature": 0.8, "top_k": 0, "top_p": 0.9,
                                        "max_new_tokens": 24, "ignore_eos": True, "seed": 4})
    prompt = lambda n: torch.randint(0, 3000, (n,)).tolist()  # noqa: E731
    mixed = [(0.0, prompt(5), greedy), (0.0, prompt(30), top_k),
             (0.03, prompt(9), penalised), (0.06, prompt(2), at_least),
             (0.09, prompt(12), greedy), (0.12, prompt(4), nucleus)]
    crowd = [(0.0, prompt(3 + i), greedy) for i in range(6)]  # steps of 6 rows: ScreenChoice
    for arrivals, fewest in (([(0.0, prompt(5), greedy)], 23),  # a step per token after the 1st
                             ([(0.0, prompt(7), top_k)], 23), (mixed, 1), (crowd, 4)):
        _, eager = run_engine(model, tokenizer, arrivals, runner="eager")
        before = screened_steps()
        engine, screened = run_engine(model, tokenizer, arrivals)
        assert engine.runner.name == "plan"
        assert screened == eager
        assert screened_steps() - before >= fewest


def test_the_last_panels_padding_is_never_picked():
    """All logits negative, the largest in the last panel (padded with zero columns)."""
    torch.manual_seed(2)
    D, V = 32, 1000  # 62 full panels and 8 columns in the last
    weight_t = -torch.rand(D, V)
    weight_t[:, V - 2] *= 0.01
    head = packed_head(weight_t)
    h = torch.rand(2, D) + 0.1
    assert screened_argmax(head, h) == full_argmax(head, h) == [V - 2, V - 2]
