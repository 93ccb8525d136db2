"""Who runs: the waiting queue, admission under the KV-cache budget, chunked prefill, and
retirement.

Admission is FIFO: the head of the queue waits until its n sequences fit under
--max_batch_size and the blocks it may need are available (kv_cache.BlockManager). Admitted
prompts are read in chunks: each prefill pass takes at most a token budget, the prompts that
were already being read first, so a long prompt is read a piece per step while the running
sequences keep decoding. A prompt read to its end starts its n sequences.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from .. import metrics
from ..model import KVCache
from .kv_cache import BlockManager
from .sequence import Request, Sequence


class QueueFull(RuntimeError):
    """The waiting queue is at --max_queue; the client should retry later."""


class RequestTimeout(RuntimeError):
    """The request waited in the queue longer than --request_timeout."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new work."""


@dataclass
class Chunk:
    """The next `length` prompt tokens of `request`, from position `start`."""

    request: Request
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length == len(self.request.prompt_ids)


class Scheduler:
    def __init__(self, cache: KVCache, max_batch_size: int, max_queue: int,
                 request_timeout: float):
        self.cache = cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.request_timeout = request_timeout
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []  # admitted, prompt partly read
        self.running: list[Sequence] = []
        # Guards `waiting` and `closed` (the asyncio side adds, the step thread takes) and
        # wakes the step thread.
        self.cond = threading.Condition()
        self.closed = False

    # ---- called from the asyncio side ----------------------------------------------------

    def blocks_needed(self, prompt_len: int, max_new: int, n: int) -> int:
        return sum(self.blocks.need(prompt_len, max_new, n))

    def add(self, requests: list[Request]) -> None:
        """Queue all of a call's requests, or none (EngineStopped, QueueFull)."""
        with self.cond:
            if self.closed:
                raise EngineStopped("server is shutting down")
            # Requests that free sequence slots will take at the next step do not count.
            free = max(0, self.max_batch_size - self.sequences)
            if len(self.waiting) + len(requests) > self.max_queue + free:
                metrics.REJECTED.inc()
                raise QueueFull(f"queue is full ({self.max_queue} waiting requests)")
            self.waiting.extend(requests)
            metrics.QUEUE_DEPTH.set(len(self.waiting))
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    @property
    def sequences(self) -> int:
        """Sequences running or about to (their prompt being read)."""
        return len(self.running) + sum(r.params.n for r in self.prefilling)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # ---- called from the step thread -----------------------------------------------------

    def next_chunks(self, budget: int, whole_new_prompts: bool = False
                    ) -> tuple[list[Chunk], list[Request]]:
        """Prompt chunks for one pass of at most `budget` tokens, counting the padding to the
        pass's widest chunk; and the requests that waited past the timeout. With
        `whole_new_prompts`, only prompts admitted now that fit whole (read between two
        layers of a step, whose own chunks are already taken)."""
        expired = self._expire()  # before admission: a request past its timeout gets a 503
        admitted = self._admit()
        chunks: list[Chunk] = []
        width = 0
        for request in admitted if whole_new_prompts else self.prefilling:
            left = len(request.prompt_ids) - request.prefilled
            if whole_new_prompts and left > (width if chunks else budget):
                continue  # read from the next step on, in chunks beside the decode rows
            if not chunks:
                width = min(left, budget)
            elif (len(chunks) + 1) * width > budget:
                break
            chunks.append(Chunk(request, request.prefilled, min(left, width)))
        return chunks, expired

    def _admit(self) -> list[Request]:
        """Waiting requests become prefilling, FIFO, while their sequences and blocks fit;
        the ones admitted."""
        now = time.monotonic()
        admitted = []
        with self.cond:
            while self.waiting:
                request = self.waiting[0]
                if self.sequences + request.params.n > self.max_batch_size:
                    break
                blocks = self.blocks.admit(*self.blocks.need(
                    len(request.prompt_ids), request.max_new, request.params.n))
                if blocks is None:
                    break  # the head of the queue waits for blocks to be freed
                request.blocks = blocks
                self.prefilling.append(self.waiting.popleft())
                admitted.append(request)
                metrics.REQUEST_QUEUE_TIME.observe(now - request.arrival)
                metrics.PROMPT_TOKENS.inc(len(request.prompt_ids))
            metrics.QUEUE_DEPTH.set(len(self.waiting))
        return admitted

    def _expire(self) -> list[Request]:
        now = time.monotonic()
        with self.cond:
            expired = [r for r in self.waiting if now - r.arrival > self.request_timeout]
            if expired:
                self.waiting = collections.deque(r for r in self.waiting if r not in expired)
                metrics.QUEUE_DEPTH.set(len(self.waiting))
        return expired

    def read(self, chunk: Chunk) -> None:
        """A chunk was prefilled; at its prompt's end the request leaves `prefilling`."""
        chunk.request.prefilled += chunk.length
        if chunk.last:
            self.prefilling.remove(chunk.request)

    def start(self, request: Request, seqs: list[Sequence]) -> None:
        """A prompt was read: its sequences join the running batch. The first takes the
        prompt's blocks; each sibling shares the full ones and copies the last partial one."""
        prompt_len = len(request.prompt_ids)
        full = prompt_len // self.cache.block_size
        prompt_blocks, growth = self.blocks.need(prompt_len, request.max_new, 1)
        for seq in seqs:
            if seq.index == 0:
                seq.blocks = request.blocks
            else:
                seq.blocks = request.blocks[:full]
                self.blocks.share(seq.blocks)
                if full < prompt_blocks:
                    seq.blocks.append(self.blocks.grow())
                    self.cache.copy_block(request.blocks[-1], seq.blocks[-1])
            seq.promised = prompt_blocks + growth - len(seq.blocks)
            self.running.append(seq)
        metrics.RUNNING.set(len(self.running))

    def grow(self, seqs: list[Sequence]) -> None:
        """Give each sequence the block its next position falls in, if it lacks it."""
        for seq in seqs:
            if (seq.length - 1) // self.cache.block_size == len(seq.blocks):
                seq.blocks.append(self.blocks.grow())
                seq.promised -= 1

    def drop_cancelled(self) -> None:
        """Cancelled requests leave: running sequences are marked to retire, queued and
        prefilling ones go at once."""
        for seq in self.running:
            if seq.request.cancelled and not seq.finish_reason:
                seq.finish_reason = "abort"
                metrics.ABORTED.inc()
        for request in [r for r in self.prefilling if r.cancelled]:
            self.drop_prefilling(request)
            metrics.ABORTED.inc(request.params.n)
        with self.cond:
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                metrics.ABORTED.inc(sum(r.params.n for r in gone))
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
                metrics.QUEUE_DEPTH.set(len(self.waiting))

    def drop_prefilling(self, request: Request) -> None:
        """A request leaves before its sequences start: its blocks and promise go back."""
        self.prefilling.remove(request)
        _, growth = self.blocks.need(len(request.prompt_ids), request.max_new,
                                     request.params.n)
        self.blocks.release(request.blocks, growth)

    def retire(self) -> None:
        """Finished sequences leave the batch and give back their blocks."""
        keep = []
        for seq in self.running:
            if seq.finish_reason:
                self.blocks.release(seq.blocks, seq.promised)
            else:
                keep.append(seq)
        self.running = keep
        metrics.RUNNING.set(len(self.running))

    def take_all_waiting(self) -> list[Request]:
        with self.cond:
            waiting, self.waiting = list(self.waiting), collections.deque()
            metrics.QUEUE_DEPTH.set(0)
        return waiting
