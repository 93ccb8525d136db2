"""Engines run on a fixed schedule: arrivals given as step numbers (and layers of a step's
pass), not wall time, so the batch each request lands in is the same on any machine. So is
each prompt chunk, as long as the chunk budget beside streams does not follow measured step
times (scheduler.ChunkBudget, --prefill_step_stretch): a schedule of more than one call needs
an engine made with prefill_step_stretch 0. (With the adaptive budget, the differential
test's int8 runner through AMX's tiles gave a log-probability 3e-7 from its twin through VNNI
on one mix, the same sums chunked otherwise; with the budget fixed, the two agree to the bit.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gpt2serve.engine import Completion, Engine, Prompt


@dataclass
class Arrival:
    """A call of one prompt, submitted before step `step`, or after layer `layer` of that
    step's pass when given (where prompts that arrive during a pass are read)."""

    step: int
    prompt: Prompt
    layer: int | None = None
    streamed: bool = True


@dataclass
class Outcome:
    completions: list[Completion] | None  # None: the call failed
    error: BaseException | None
    prompt_logprobs: list
    cached_tokens: int  # of its prompt, read from the prefix cache


def run_schedule(engine: Engine, arrivals: list[Arrival], max_steps: int = 2000
                 ) -> list[Outcome]:
    """Run every arrival on an engine made with threaded=False; each call's outcome, in the
    order of `arrivals`."""
    return asyncio.run(_run(engine, arrivals, max_steps))


async def _run(engine: Engine, arrivals: list[Arrival], max_steps: int) -> list[Outcome]:
    assert not engine.threaded
    assert len(arrivals) <= 1 or not engine.scheduler.budget.adaptive, \
        "chunks sized by measured step times: make the engine with prefill_step_stretch=0"
    calls: dict[int, list] = {}

    def submit(i: int) -> None:
        a = arrivals[i]
        calls[i] = engine.submit([a.prompt], streamed=a.streamed)

    step = 0
    while step < max_steps:
        for i, a in enumerate(arrivals):
            if a.step == step and a.layer is None:
                submit(i)
        layer = 0

        def between_layers() -> None:
            nonlocal layer
            for i, a in enumerate(arrivals):
                if a.step == step and a.layer == layer and i not in calls:
                    submit(i)
            layer += 1

        engine.step(between_layers)
        for i, a in enumerate(arrivals):  # a pass without layer calls (prompts alone)
            if a.step == step and a.layer is not None and i not in calls:
                submit(i)
        await asyncio.sleep(0)  # the outbox's deliveries
        step += 1
        if len(calls) == len(arrivals) and not engine.scheduler.busy:
            break
    else:
        raise AssertionError(f"the schedule did not finish in {max_steps} steps")
    await asyncio.sleep(0)
    return [_outcome(calls[i]) for i in range(len(arrivals))]


def _outcome(requests) -> Outcome:
    (request,) = requests
    completions = [Completion(i) for i in range(request.params.n)]
    error = None
    while not request.events.empty():
        _, item = request.events.get_nowait()
        if isinstance(item, BaseException):
            error = item
            break
        completions[item.index].add(item)
    if error is None:
        assert all(c.finish_reason for c in completions), "a sequence did not finish"
    return Outcome(None if error else completions, error, request.prompt_logprobs,
                   request.cached_tokens)
