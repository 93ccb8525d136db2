"""Who runs: the waiting queue, admission into KV-cache slots, and retirement.

Running sequences sit in slots 0..B-1 of the cache (`running[i]` in slot i), so a decode step
attends over one plain slice of it. Admission is FIFO: the head of the queue waits until its
n sequences fit, and the prompts admitted together are prefilled in one padded pass under a
token budget. A finished sequence's slot is refilled by the last running one: one cache copy
per retirement, and none when the last one is the one that finished.
"""

from __future__ import annotations

import collections
import threading
import time

from .. import metrics
from ..model import KVCache
from .sequence import Request, Sequence

# Prompts prefilled in one forward pass are padded to the longest; this bounds padded tokens
# per pass (activation memory and the time other sequences wait for their next token).
PREFILL_TOKEN_BUDGET = 4096


class QueueFull(RuntimeError):
    """The waiting queue is at --max_queue; the client should retry later."""


class RequestTimeout(RuntimeError):
    """The request waited in the queue longer than --request_timeout."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new work."""


class Scheduler:
    def __init__(self, cache: KVCache, max_batch_size: int, max_queue: int,
                 request_timeout: float):
        self.cache = cache
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.request_timeout = request_timeout
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Sequence] = []
        # Guards `waiting` and `closed` (the asyncio side adds, the step thread takes) and
        # wakes the step thread.
        self.cond = threading.Condition()
        self.closed = False

    # ---- called from the asyncio side ----------------------------------------------------

    def add(self, requests: list[Request]) -> None:
        """Queue all of a call's requests, or none (EngineStopped, QueueFull)."""
        with self.cond:
            if self.closed:
                raise EngineStopped("server is shutting down")
            # Requests that free slots will take at the next step do not count as queued.
            free_slots = max(0, self.max_batch_size - len(self.running))
            if len(self.waiting) + len(requests) > self.max_queue + free_slots:
                metrics.REJECTED.inc()
                raise QueueFull(f"queue is full ({self.max_queue} waiting requests)")
            self.waiting.extend(requests)
            metrics.QUEUE_DEPTH.set(len(self.waiting))
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    # ---- called from the step thread -----------------------------------------------------

    def next_prefill(self) -> tuple[list[Request], list[Request]]:
        """Requests to prefill now (FIFO, while their sequences fit in free slots and the
        padded batch in the token budget), and those that waited past the timeout."""
        now = time.monotonic()
        batch, expired, free = [], [], self.max_batch_size - len(self.running)
        with self.cond:
            while self.waiting:
                request = self.waiting[0]
                if now - request.arrival > self.request_timeout:
                    expired.append(self.waiting.popleft())
                    continue
                longest = max([len(request.prompt_ids)] + [len(r.prompt_ids) for r in batch])
                if request.params.n > free or (
                        batch and (len(batch) + 1) * longest > PREFILL_TOKEN_BUDGET):
                    break  # the head of the queue waits for slots (or the next round)
                batch.append(self.waiting.popleft())
                free -= request.params.n
            metrics.QUEUE_DEPTH.set(len(self.waiting))
        return batch, expired

    def place(self, batch: list[Request], seqs: list[list[Sequence]]) -> list[tuple[Sequence, int]]:
        """Put the sequences of a batch just prefilled into slots first.. (first = the number
        running, where the prefill wrote its prompts in order); returns (sequence, batch row).

        Each request's first sequence keeps its prompt's slot; siblings (n > 1) go after all
        of them, with a copy of the prompt's cache."""
        first = len(self.running)
        placed = []
        for row, request_seqs in enumerate(seqs):
            placed.append((request_seqs[0], row))
        for row, request_seqs in enumerate(seqs):
            placed.extend((seq, row) for seq in request_seqs[1:])
        for seq, row in placed:
            seq.slot = len(self.running)
            if seq.index:
                self.cache.move(first + row, seq.slot, len(batch[row].prompt_ids))
            self.running.append(seq)
        metrics.RUNNING.set(len(self.running))
        return placed

    def drop_cancelled(self) -> None:
        """Cancelled requests leave: running sequences are marked to retire, queued ones go."""
        for seq in self.running:
            if seq.request.cancelled and not seq.finish_reason:
                seq.finish_reason = "abort"
                metrics.ABORTED.inc()
        with self.cond:
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                metrics.ABORTED.inc(sum(r.params.n for r in gone))
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
                metrics.QUEUE_DEPTH.set(len(self.waiting))

    def retire(self) -> None:
        """Drop finished sequences; the last running one moves into each freed slot."""
        running = self.running
        slot = 0
        while slot < len(running):
            if not running[slot].finish_reason:
                slot += 1
                continue
            last = running.pop()
            if slot < len(running):
                if not last.finish_reason:
                    self.cache.move(last.slot, slot, last.length - 1)
                last.slot = slot
                running[slot] = last  # checked again on the next pass of the loop
        metrics.RUNNING.set(len(running))

    def take_all_waiting(self) -> list[Request]:
        with self.cond:
            waiting, self.waiting = list(self.waiting), collections.deque()
            metrics.QUEUE_DEPTH.set(0)
        return waiting
