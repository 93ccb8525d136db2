"""How the engine hands a call's events to its event loop: a streamed call token by token, a
call that wants whole completions (V1 predict, non-streaming OpenAI and generate) each
sequence's events together when it ends, the same events either way."""

import asyncio
import gc
import weakref

import pytest

from gpt2serve import checkpoint
from gpt2serve.engine import Engine, EngineConfig, Prompt
from gpt2serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, tokenizer = checkpoint.load(tiny_model)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=4))
    yield engine
    engine.stop()


def first_event_and_rest(engine, streamed: bool):
    """Submit a 40-token call with two sequences; when its first event arrives, whether both
    sequences had ended and how many events were already queued; then all its events."""
    params = SamplingParams.from_dict({"temperature": 1.0, "seed": 3, "n": 2,
                                       "max_new_tokens": 40, "ignore_eos": True})

    async def run():
        requests = engine.submit([Prompt([5, 6, 7], params)], streamed=streamed)
        events = engine.stream(requests)
        first = await anext(events)
        ended = all(s.finish_reason for s in requests[0].seqs)
        queued = requests[0].events.qsize()
        return ended, queued, [first] + [ev async for ev in events]

    return asyncio.run(run())


def test_a_call_that_is_not_streamed_gets_each_sequence_whole(engine):
    ended, queued, whole = first_event_and_rest(engine, streamed=False)
    # Both sequences end in the same step, and all their 80 events come in one hand-over.
    assert ended and queued == 79
    _, _, streamed = first_event_and_rest(engine, streamed=True)
    by_sequence = [[(ev.token_id, ev.text, ev.finish_reason) for _, ev in events
                    if ev.index == i] for events in (whole, streamed) for i in (0, 1)]
    assert by_sequence[:2] == by_sequence[2:]  # the same events, in the same order
    assert [len(events) for events in by_sequence] == [40] * 4


def test_a_stream_whose_response_ends_before_its_first_event_cancels_its_requests(engine):
    """server.middleware.EventStream over a call's events, its response cancelled at its
    first await (CancelOnDisconnect does that when the client leaves at once): the events'
    generator never started, so its own cleanup never ran and the call generated to its
    token limit for nobody. The response cancels the requests itself: they leave the queue,
    or end 'abort' if they had started."""
    from gpt2serve.server.middleware import EventStream

    params = SamplingParams.from_dict({"max_new_tokens": 100, "ignore_eos": True})

    async def run():
        requests = engine.submit([Prompt([5, 6, 7], params)])

        async def events():
            async for _, ev in engine.stream(requests):
                yield ev.text

        async def send(message):  # a socket that takes its time
            await asyncio.sleep(0.05)

        response = EventStream(events(), engine, requests)
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        task = asyncio.create_task(response(scope, asyncio.Event().wait, send))
        await asyncio.sleep(0)  # it starts, and is cancelled before any event
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if engine.load == (0, 0):
                break
            await asyncio.sleep(0.01)
        return requests[0].cancelled, {s.finish_reason for s in requests[0].seqs}

    cancelled, reasons = asyncio.run(run())
    assert cancelled and reasons <= {"abort"}


def test_a_calls_error_is_freed_once_caught_without_a_full_collection():
    """Engine.stream's frame, in the traceback of the error it raised for a call, held that
    error: a cycle, freed with the call's requests and every frame above only by a full
    collection of the cyclic garbage, which a process of torch's size runs rarely (a queue
    timeout under overload, each time)."""
    from gpt2serve.engine.scheduler import RequestTimeout

    model, tokenizer = checkpoint.load(None)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=1, request_timeout=0.01),
                    threaded=False)
    params = SamplingParams.from_dict({"max_new_tokens": 2})

    async def scenario():
        engine.submit([Prompt([1, 2], params)])  # takes the one slot
        (waiting,) = engine.submit([Prompt([3, 4], params)])
        held = weakref.ref(waiting)
        waiting.arrival -= 1  # as if it had waited a second, past --request_timeout
        engine.step()
        with pytest.raises(RequestTimeout):
            async for _ in engine.stream([waiting]):
                pass
        del waiting
        return held

    gc.disable()
    try:
        assert asyncio.run(scenario())() is None
    finally:
        gc.enable()
        engine.stop()


def stepped_demo_engine(**config) -> Engine:
    """The demo model's engine, stepped by the test (threaded=False)."""
    model, tokenizer = checkpoint.load(None)
    return Engine(model, tokenizer, EngineConfig(**config), threaded=False)


def test_a_call_that_fails_on_one_prompt_counts_no_other_as_aborted():
    """A queue timeout of a call's second prompt ended the call, and the first prompt's
    sequence, dropped with it while its client waited for that 503, was counted in
    gpt2serve_aborted_sequences_total ("client went away"). A client that leaves still is."""
    from gpt2serve.engine.scheduler import RequestTimeout

    engine = stepped_demo_engine(max_batch_size=1, request_timeout=5)
    params = SamplingParams.from_dict({"max_new_tokens": 20, "ignore_eos": True})
    aborted = engine.metrics.aborted

    async def scenario():
        first, late = engine.submit([Prompt([1, 2], params), Prompt([3, 4], params)])
        late.arrival -= 10  # past --request_timeout
        engine.step()  # the first starts, the late one expires: the call fails
        with pytest.raises(RequestTimeout):
            async for _ in engine.stream([first, late]):
                pass
        before = aborted._value.get()
        engine.step()  # the first leaves the batch
        assert first.cancelled and not engine.scheduler.running
        assert aborted._value.get() == before
        (gone,) = engine.submit([Prompt([5, 6], params)])
        events = engine.stream([gone])
        engine.step()
        await anext(events)
        await events.aclose()  # its client leaves
        engine.step()
        assert aborted._value.get() == before + 1

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


def test_a_steps_time_per_output_token_holds_the_prompts_read_during_it():
    """A prompt that arrives during a step's pass is read between two of its layers, and the
    step's streams wait for it: gpt2serve_time_per_output_token_seconds (which says so) left
    that read out, 2.7 ms observed for a step of 37.9."""
    import time

    engine = stepped_demo_engine(max_batch_size=2, prefill_step_stretch=0)
    params = SamplingParams.from_dict({"max_new_tokens": 8, "ignore_eos": True})
    per_token = engine.metrics.time_per_token

    async def scenario():
        engine.submit([Prompt([1, 2], params)])
        engine.step()  # it streams
        engine.step()
        before = per_token._sum.get()
        start = time.perf_counter()
        arrived = []  # (called between every two layers: one arrival, after the first)
        engine.step(lambda: arrived or arrived.append(
            engine.submit([Prompt(list(range(3, 203)), params)])))
        whole = time.perf_counter() - start
        assert len(engine.scheduler.running) == 2 and not engine.scheduler.waiting  # read
        assert per_token._sum.get() - before >= 0.5 * whole

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


def test_a_step_that_fails_still_answers_the_requests_that_expired_in_it():
    """The step's expired requests had left the queue when its prompt's start raised (a
    bug's stand-in): the step's failure took them with it, and their callers waited
    forever. The failure costs the prompt; the expired hear of their timeout."""
    from gpt2serve.engine.scheduler import EngineError, RequestTimeout

    model, tokenizer = checkpoint.load(None)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=1, request_timeout=5),
                    threaded=False)
    params = SamplingParams.from_dict({"max_new_tokens": 2})

    def start_fails(tokenizer, eos_id):
        raise RuntimeError("bug")

    async def scenario():
        (first,) = engine.submit([Prompt([1, 2], params)])
        (late,) = engine.submit([Prompt([3, 4], params)])
        late.arrival -= 10  # past --request_timeout
        first.start = start_fails
        engine.step()
        for request, error in ((first, EngineError), (late, RequestTimeout)):
            with pytest.raises(error):
                await asyncio.wait_for(anext(engine.stream([request])), 5)

    try:
        asyncio.run(scenario())
        assert not engine.scheduler.busy
    finally:
        engine.stop()


def test_a_max_model_len_past_the_models_context_is_said_as_it_loads(caplog):
    """--max_model_len 5000 on a model of 256 positions was capped without a word."""
    model, tokenizer = checkpoint.load(None)
    context = model.config.n_positions
    with caplog.at_level("WARNING", logger="gpt2serve.engine"):
        engine = Engine(model, tokenizer, EngineConfig(max_batch_size=2,
                                                       max_model_len=context + 1),
                        threaded=False)
    assert engine.context == context
    assert f"--max_model_len {context + 1} is more than this model's context" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpt2serve.engine"):
        Engine(model, tokenizer, EngineConfig(max_batch_size=2, max_model_len=context),
               threaded=False)
    assert "max_model_len" not in caplog.text
