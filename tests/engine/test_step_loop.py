"""One step thread for many models (engine/step_loop.py): a prompt for one model that arrives
during another model's pass is read between two of that pass's layers (on a fixed schedule,
against the model served alone), and stepping in turn lets a quiet model finish while a busy
one streams, whatever the machine's speed."""

from __future__ import annotations

import asyncio

import pytest

from conftest import make_hf_model
from gpt2serve import checkpoint
from gpt2serve.engine import Completion, Engine, EngineConfig, Prompt
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


def test_a_neighbours_prompt_is_read_between_two_layers_and_generates_what_it_would_alone(
        two_models):
    (model_a, tok_a), (model_b, tok_b) = two_models
    ids = tok_b.encode("ROMEO: But soft")
    (alone,) = run_schedule(Engine(model_b, tok_b, CONFIG, threaded=False),
                            [Arrival(0, Prompt(ids, SHORT))])
    a = Engine(model_a, tok_a, CONFIG, threaded=False, name="a")
    b = Engine(model_b, tok_b, CONFIG, threaded=False, name="b")

    async def scenario() -> str:
        streams = a.submit([Prompt(tok_a.encode("JULIET:"), LONG) for _ in range(4)])
        for _ in range(3):
            a.step()
        calls = []

        def arrives() -> None:  # B's prompt lands during A's pass, after its first layer
            if not calls:
                calls.append(b.submit([Prompt(ids, SHORT)], streamed=True))

        running = list(a.scheduler.running)
        a.step(arrives, neighbours=[b])
        await asyncio.sleep(0)
        (request,) = calls[0]
        assert request.events.qsize() == 1  # its first token came out within A's step
        assert [len(s.tokens) for s in a.scheduler.running] == [
            len(s.tokens) for s in running]  # and A's streams still took their step
        while b.scheduler.busy:
            b.step()
        await asyncio.sleep(0)
        out = Completion(0)
        while not request.events.empty():
            out.add(request.events.get_nowait()[1])
        a.cancel(streams)
        return out.text

    assert asyncio.run(scenario()) == alone.completions[0].text


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
