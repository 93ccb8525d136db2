"""The hand-over of a step's events from the step thread to the asyncio side: one
`loop.call_soon_threadsafe` per event loop and flush, so HTTP handlers never block and are not
woken once per token of every stream."""

from __future__ import annotations

import asyncio

from .sequence import Request, TokenEvent


class Outbox:
    """What the step thread has for the asyncio side, handed over in one call per event loop
    when flushed: a call per event woke the server's loop once per token of every stream.
    A call that is not streamed gets its events when a sequence ends (or fails): waking its
    loop for each token cost the step thread the GIL while that loop ran
    (docs/benchmarks.md, "Why it is fast")."""

    def __init__(self) -> None:
        self._items: list[tuple[Request, TokenEvent | BaseException]] = []

    def put(self, request: Request, item: TokenEvent | BaseException) -> None:
        if not request.streamed and isinstance(item, TokenEvent) and not item.finish_reason:
            request.held.append(item)
            return
        self._items += [(request, held) for held in request.held]
        request.held.clear()
        self._items.append((request, item))

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, item in self._items:
            by_loop.setdefault(request.loop, []).append((request, item))
        self._items = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # its event loop is closed: nobody is listening any more
                for request, _ in items:
                    request.cancelled = True


def _deliver(items: list[tuple[Request, TokenEvent | BaseException]]) -> None:
    for request, item in items:
        request.events.put_nowait((request.index, item))
