"""The outbox's hand-over of events to the asyncio side, without a model or a server."""

from __future__ import annotations

import asyncio

from gpt2serve.engine.outbox import Outbox
from gpt2serve.engine.sequence import Prompt, Request, TokenEvent
from gpt2serve.sampling import SamplingParams


def _request(loop, streamed: bool) -> Request:
    params = SamplingParams.from_dict({"max_new_tokens": 3})
    return Request(Prompt([1, 2], params), 0, 3, asyncio.Queue(), loop, streamed)


def _drain(request: Request) -> list:
    items = []
    while not request.events.empty():
        items.append(request.events.get_nowait()[1])
    return items


def test_events_go_out_on_flush_and_whole_calls_get_them_when_a_sequence_ends():
    async def scenario():
        loop = asyncio.get_running_loop()
        streamed, whole = _request(loop, True), _request(loop, False)
        box = Outbox()
        first, last = TokenEvent(0, 5, "a"), TokenEvent(0, 6, "b", finish_reason="length")
        box.put(streamed, first), box.put(whole, first)
        await asyncio.sleep(0)
        assert _drain(streamed) == [] and _drain(whole) == []  # nothing before a flush
        box.flush()
        await asyncio.sleep(0)
        assert _drain(streamed) == [first] and _drain(whole) == []  # held until it ends
        box.put(whole, last)
        box.flush()
        await asyncio.sleep(0)
        assert _drain(whole) == [first, last]
        error = RuntimeError("x")
        box.put(whole, error)  # an error goes out at once, whatever the call wants
        box.flush()
        await asyncio.sleep(0)
        assert _drain(whole) == [error]

    asyncio.run(scenario())


def test_a_request_whose_event_loop_closed_is_cancelled():
    loop = asyncio.new_event_loop()
    request = _request(loop, True)
    loop.close()
    box = Outbox()
    box.put(request, TokenEvent(0, 5, "a"))
    box.flush()
    assert request.cancelled
