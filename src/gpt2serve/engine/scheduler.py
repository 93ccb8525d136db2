"""Who runs each step: the waiting queue, admission under the KV-cache budget, chunked
prefill and its budget, and the state changes a step's outcome makes (reads, starts, retirement).

Admission is FIFO: the head of the queue waits until its n sequences fit under
--max_batch_size and the blocks it may need are available (kv_cache.BlockManager). Admitted
prompts are read in chunks: each prefill pass takes at most a token budget, the prompts that
were already being read first, so a long prompt is read a piece per step while the running
sequences keep decoding. A prompt read to its end starts its n sequences. Beside streams the
budget is sized so that the step takes about --prefill_step_stretch decode steps; beside
whole completions it is the most (ChunkBudget)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from ..model import KVCache
from ..sampling import SamplingError
from ..tokenizer import Tokenizer
from .config import EngineConfig
from .kv_cache import BlockManager, block_key, prefix_keys
from .sequence import Request, Sequence

MIN_CHUNK = 16  # prompt tokens read beside a decode step, at the least

log = logging.getLogger("gpt2serve.engine")


class QueueFull(RuntimeError):
    """The waiting queue is at --max_queue; the client should retry later."""


class RequestTimeout(RuntimeError):
    """The request waited in the queue longer than --request_timeout."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new work."""


SHUTTING_DOWN = "server is shutting down"


class EngineError(RuntimeError):
    """A step failed this request for a reason of the engine's own (a bug): the log has the
    details, the client only that it was an internal error."""

    def __init__(self) -> None:
        super().__init__("internal error")


@dataclass
class Chunk:
    """The next `length` prompt tokens of `request`, from position `start`."""

    request: Request
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length == len(self.request.prompt_ids)


@dataclass
class ScheduledStep:
    """One forward pass: the next token of each running sequence in `decode`, then the
    prompt pieces in `chunks`. `started` holds the sequences of the prompts this step reads to
    their end, which take their first token from their prompt's last row.
    `streams_elsewhere`: another model on the same step thread has a stream running, which
    waits for this pass."""

    decode: list[Sequence]
    chunks: list[Chunk]
    started: list[Sequence] = field(default_factory=list)
    streams_elsewhere: bool = False

    @property
    def rows(self) -> list[Sequence]:
        """The sequences sampled after the pass, in the order of their rows of logits."""
        return self.decode + self.started

    @property
    def streams(self) -> bool:
        """Whether a stream waits for this decode step: one of its rows, or another model's
        (a pass with no decode rows has no decode step to be stretched: ChunkBudget)."""
        return streams(self.decode) or (bool(self.decode) and self.streams_elsewhere)

    def __bool__(self) -> bool:
        return bool(self.decode or self.chunks)


def streams(seqs: list[Sequence]) -> bool:
    """Whether one of the sequences is a stream's: its caller sees every token as it comes."""
    return any(s.request.streamed for s in seqs)


def _average(mean: float, value: float) -> float:
    """An exponential moving average; the first value starts it."""
    return value if not mean else 0.8 * mean + 0.2 * value


class ChunkBudget:
    """Prompt tokens to read beside the next decode step (padding included).

    Beside streams (a decode row of a streamed request, or of another model's on the same
    step thread, which waits for this step to end): a quarter more while a step with a chunk
    takes at most `stretch` decode steps (--prefill_step_stretch), less in proportion when it
    takes longer. Streams then wait at most about that much longer for a token while a long
    prompt is read, whatever the model, machine or context; growing by steps bounds what one
    noisy measurement can cost. The price is the prompt's: each step reads every weight for a
    chunk that adds (stretch - 1) decode steps of work, so at 1.5 a prompt beside streams is
    read at about a third of its speed alone.

    Beside rows none of which streams (whole completions: V1 and V2 predictions, OpenAI
    without `stream`, Engine.complete), with no decode rows, with a stretch of 0 or with
    `adaptive` False (CUDA graphs, where a step with a prompt chunk runs eagerly and costs
    several graph steps whatever its size: launches, not tokens, take the time): the most.
    A whole completion has no gaps between tokens to keep even, only its end, and prompts
    read at full speed join the batch sooner: the most tokens a second. A pass of prompts
    alone reads the most even while another model's streams wait for it: it has no decode
    step of its own to be measured against (a model's first prompt would be read at the
    least, a few tokens a round)."""

    def __init__(self, max_prefill_tokens: int, adaptive: bool,
                 stretch: float = EngineConfig.prefill_step_stretch):
        self.max_tokens, self.stretch = max_prefill_tokens, stretch
        self.adaptive = adaptive and stretch > 0
        self.beside_streams = MIN_CHUNK if self.adaptive else max_prefill_tokens
        self.step_seconds = 0.0  # a decode step's time, with no prompt chunk in it

    def tokens(self, streams: bool) -> int:
        """The budget of a pass beside decode rows that include a stream (`streams`), or
        not."""
        return self.beside_streams if streams else self.max_tokens

    def observe(self, step: ScheduledStep, seconds: float) -> None:
        if step.decode and not step.chunks:
            self.step_seconds = _average(self.step_seconds, seconds)
        elif step.streams and self.adaptive:
            target = self.stretch * self.step_seconds
            if seconds <= target:
                grown = int(self.beside_streams * 1.25)
            else:
                grown = int(self.beside_streams * max(0.5, target / seconds))
            self.beside_streams = max(MIN_CHUNK, min(self.max_tokens, grown))


class Scheduler:
    def __init__(self, cache: KVCache, blocks: BlockManager, tokenizer: Tokenizer,
                 eos_id: int | None, max_batch_size: int, max_queue: int,
                 request_timeout: float, budget: ChunkBudget, prefix_caching: bool = True,
                 cond: threading.Condition | None = None):
        self.cache, self.blocks, self.budget = cache, blocks, budget
        self.metrics = blocks.metrics
        self.prefix_caching = prefix_caching
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.request_timeout = request_timeout
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []  # admitted, prompt partly read
        self.running: list[Sequence] = []
        # Guards `waiting` and `closed` (the asyncio side adds, the step thread takes) and
        # wakes the step thread; the StepLoop's, shared by the engines it steps.
        self.cond = cond or threading.Condition()
        self.closed: str | None = None  # why new requests are refused (EngineStopped), once so
        # Requests that left the queue without a slot, each with its error (past
        # --request_timeout; or failed at admission by a bug of ours, alone rather than with
        # the queue behind it): the engine sends them after every step, a failed one too.
        self.refused: list[tuple[Request, Exception]] = []

    # ---- called from the asyncio side ----------------------------------------------------

    def check_capacity(self, prompt_len: int, max_new: int, n: int) -> None:
        """SamplingError if the request could never be admitted: it needs more blocks than
        the cache has for sequences (a block set aside for CUDA graphs is not one of them)."""
        blocks = sum(self.blocks.need(prompt_len, max_new, n))
        if blocks > self.blocks.num_blocks:
            size = self.cache.block_size
            raise SamplingError(
                f"'n' {n} sequences of up to {prompt_len + max_new} tokens need "
                f"{blocks * size} tokens of KV cache; this server holds "
                f"{self.blocks.num_blocks * size} (--kv_cache_memory)")

    def add(self, requests: list[Request]) -> None:
        """Queue all of a call's requests, or none (EngineStopped, QueueFull)."""
        with self.cond:
            if self.closed:
                raise EngineStopped(self.closed)
            # Requests that free sequence slots will take at the next step do not count.
            free = max(0, self.max_batch_size - self.sequences)
            if len(self.waiting) + len(requests) > self.max_queue + free:
                self.metrics.rejected.inc(len(requests))
                raise QueueFull(f"queue is full ({self.max_queue} waiting requests)")
            self.waiting.extend(requests)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    @property
    def sequences(self) -> int:
        """Sequences running or about to (their prompt being read)."""
        return len(self.running) + sum(r.params.n for r in self.prefilling)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # ---- called from the step thread -----------------------------------------------------

    def schedule(self, streams_elsewhere: bool = False) -> ScheduledStep:
        """The next step: every running sequence (each given the block its next position
        falls in) and prompt chunks under the budget, the streams' while a stream waits for
        the step (its own, or another model's on the same thread: `streams_elsewhere`)."""
        decode = list(self.running)
        self.grow(decode)
        step = ScheduledStep(decode, [], streams_elsewhere=streams_elsewhere)
        return self._step(step, self.budget.tokens(step.streams), whole_new_prompts=False)

    def schedule_newcomers(self, budget: int) -> ScheduledStep:
        """A pass of prompts admitted now that fit whole within `budget`, read between two
        layers of a step (whose own chunks are already taken)."""
        return self._step(ScheduledStep([], []), budget, whole_new_prompts=True)

    def _step(self, step: ScheduledStep, budget: int, whole_new_prompts: bool
              ) -> ScheduledStep:
        """`step` (its decode rows) with the prompt chunks that fit `budget`."""
        if self.waiting:  # before admission: a request past its timeout gets a 503
            self._expire()
        step.chunks = (self.next_chunks(budget, whole_new_prompts)
                       if self.waiting or self.prefilling else [])
        step.started = [s for c in step.chunks if c.last
                        for s in c.request.start(self.tokenizer, self.eos_id)]
        return step

    def update(self, step: ScheduledStep, prompt_logprobs: list[tuple[Request, list]] = (),
               failed: list[Sequence] = ()) -> None:
        """A step's pass ran: its chunks were read, and prompts read to their end start their
        sequences (running before they leave `prefilling`: never idle in between). Scored
        prompt tokens are added to their requests; a sequence that failed fails its request."""
        for chunk in step.chunks:
            if chunk.last:
                self.start(chunk.request, chunk.request.seqs)
            self.read(chunk)
        self.metrics.running.set(self.sequences)  # (started, counted twice until read)
        for seq in step.decode:
            self._remember_filled(seq)
        for request, scored in prompt_logprobs:
            request.prompt_logprobs += scored
        for seq in failed:
            seq.request.fail()

    def abort(self, waiting: bool = False) -> list[Request]:
        """Every request running or being prefilled leaves (its sequences marked failed),
        and every waiting one if asked; those still owed an answer, each once."""
        told = [r for r in {id(s.request): s.request for s in self.running}.values()
                if not all(s.finish_reason for s in r.seqs)]
        for seq in self.running:
            seq.request.fail()
        self.retire()
        for request in list(self.prefilling):
            self.drop_prefilling(request)
            told.append(request)
        return told + (self.take_all_waiting() if waiting else [])

    def next_chunks(self, budget: int, whole_new_prompts: bool = False) -> list[Chunk]:
        """Prompt chunks for one pass of at most `budget` tokens, counting the padding to the
        pass's widest chunk. With `whole_new_prompts`, only prompts admitted now that fit
        whole."""
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
        return chunks

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
                try:
                    hits = self._cached_prefix(request)
                    blocks = self._admitted_blocks(request, hits)
                except Exception:  # (retried, it would fail every step and hold the queue)
                    log.exception("admitting a request failed")
                    self.refused.append((self.waiting.popleft(), EngineError()))
                    continue
                if blocks is None:
                    break  # the head of the queue waits for blocks to be freed
                request.blocks = blocks
                request.prefilled = request.cached_tokens = len(hits) * self.cache.block_size
                if self._caches(request):  # (looked up: with caching off, no query)
                    self.metrics.prefix_cache_queries.inc(len(request.prompt_ids))
                    self.metrics.prefix_cache_hits.inc(request.cached_tokens)
                self.prefilling.append(self.waiting.popleft())
                admitted.append(request)
                self.metrics.request_queue_time.observe(now - request.arrival)
                self.metrics.prompt_tokens.inc(len(request.prompt_ids))
            self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(self.sequences)
        return admitted

    def _admitted_blocks(self, request: Request, hits: list[int]) -> list[int] | None:
        """The request's prompt blocks, `hits` first, with its growth reserved (None: they
        are not all free); the blocks its first sequence may grow into are kept for it."""
        length = len(request.prompt_ids)
        prompt_blocks, growth = self.blocks.need(length, request.max_new, request.params.n)
        return self.blocks.admit(prompt_blocks, growth, hits,
                                 keep=self.blocks.need(length, request.max_new, 1)[1])

    def _cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks a request's prompt starts with, at most all but the one holding
        its last token (always read: its logits give the first new token); none for a
        prompt whose every token is scored (echo with logprobs needs every row's logits)."""
        if not self._caches(request):
            return []
        size = self.cache.block_size
        if not request.prefix_keys:  # (once: the head of the queue may wait many steps)
            request.prefix_keys = prefix_keys(request.prompt_ids, size,
                                              request.params.cache_salt)
        return self.blocks.cached(request.prefix_keys[:(len(request.prompt_ids) - 1) // size])

    def _caches(self, request: Request) -> bool:
        return self.prefix_caching and request.wants_prompt_logprobs is None

    def _remember_filled(self, seq: Sequence) -> None:
        """A decode step that wrote the last position of one of the sequence's blocks: the
        block joins the prefix cache, as a prompt's do once read, so that a prompt going on
        from this sequence's text (a chat's next turn: the last prompt, its answer and more)
        reads only the rest (vLLM caches these blocks too)."""
        size = self.cache.block_size
        if seq.keys is None or seq.length % size or seq.length // size - 1 != len(seq.keys):
            return
        i = len(seq.keys)
        seq.keys.append(block_key(seq.keys, seq.history()[i * size:(i + 1) * size],
                                  seq.params.cache_salt))
        self.blocks.remember(seq.blocks[i], seq.keys[-1])

    def _expire(self) -> None:
        now = time.monotonic()
        with self.cond:
            expired = [r for r in self.waiting if now - r.arrival > self.request_timeout]
            if expired:
                self.waiting = collections.deque(r for r in self.waiting if r not in expired)
                self.metrics.queue_depth.set(len(self.waiting))
                self.metrics.rejected.inc(len(expired))
        self.refused += [(r, RequestTimeout(f"waited more than {self.request_timeout:g}s for "
                                            "a free slot")) for r in expired]

    def take_refused(self) -> list[tuple[Request, Exception]]:
        refused, self.refused = self.refused, []
        return refused

    def read(self, chunk: Chunk) -> None:
        """A chunk was prefilled: the prompt blocks it filled join the prefix cache, and at
        its prompt's end the request leaves `prefilling`."""
        request, size = chunk.request, self.cache.block_size
        for i in range(request.prefilled // size,
                       min((request.prefilled + chunk.length) // size, len(request.prefix_keys))):
            self.blocks.remember(request.blocks[i], request.prefix_keys[i])
        chunk.request.prefilled += chunk.length
        if chunk.last:
            self.prefilling.remove(chunk.request)

    def start(self, request: Request, seqs: list[Sequence]) -> None:
        """A prompt was read: its sequences join the running batch. The first takes the
        prompt's blocks; each sibling shares the full ones and copies the last partial one,
        which it will write to, or shares it too if it only reads the prompt (max_new 0)."""
        prompt_len = len(request.prompt_ids)
        full = prompt_len // self.cache.block_size if request.max_new else len(request.blocks)
        prompt_blocks, growth = self.blocks.need(prompt_len, request.max_new, 1)
        siblings = []  # their tables built so far
        try:
            for seq in seqs:
                seq.keys = list(request.prefix_keys) if self._caches(request) else None
                if seq.index == 0:
                    seq.blocks = request.blocks
                    seq.promised = prompt_blocks + growth - len(seq.blocks)
                    continue
                seq.blocks, seq.promised = request.blocks[:full], prompt_blocks + growth - full
                self.blocks.share(seq.blocks)
                siblings.append(seq)
                if full < prompt_blocks:
                    seq.blocks.append(self.blocks.grow(seq.blocks, seq.promised))
                    seq.promised -= 1
                    self.cache.copy_block(request.blocks[-1], seq.blocks[-1])
        except BaseException:
            # None runs yet: the request, still prefilling, gives back its blocks and the
            # whole promise when it fails (drop_prefilling), the siblings' tables here once
            for seq in siblings:
                self.blocks.release(seq.blocks, seq.promised)
                self.blocks.promised += prompt_blocks + growth - full
            raise
        self.running += seqs

    def grow(self, seqs: list[Sequence]) -> None:
        """Give each sequence the block its next position falls in, if it lacks it."""
        for seq in seqs:
            if (seq.length - 1) // self.cache.block_size == len(seq.blocks):
                seq.blocks.append(self.blocks.grow(seq.blocks, seq.promised))
                seq.promised -= 1

    def drop_cancelled(self) -> None:
        """Cancelled requests leave: running sequences are marked to retire, queued and
        prefilling ones go at once. Each sequence is counted as aborted, but those of a
        call that failed on another of its requests (their client got that error)."""
        def aborted(request: Request, sequences: int) -> None:
            if not request.failed_beside:
                self.metrics.aborted.inc(sequences)
        for seq in self.running:
            if seq.request.cancelled and not seq.finish_reason:
                seq.finish_reason = "abort"
                aborted(seq.request, 1)
        for request in [r for r in self.prefilling if r.cancelled]:
            self.drop_prefilling(request)
            aborted(request, request.params.n)
        with self.cond:
            gone = [r for r in self.waiting if r.cancelled]
            for request in gone:
                aborted(request, request.params.n)
            if gone:
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
                self.metrics.queue_depth.set(len(self.waiting))

    def drop_prefilling(self, request: Request) -> None:
        """A request leaves before its sequences start: its blocks and promise go back."""
        self.prefilling.remove(request)
        _, growth = self.blocks.need(len(request.prompt_ids), request.max_new,
                                     request.params.n)
        self.blocks.release(request.blocks, growth)
        self.metrics.running.set(self.sequences)

    def retire(self) -> None:
        """Finished sequences leave the batch and give back their blocks."""
        keep = []
        for seq in self.running:
            if seq.finish_reason:
                self.blocks.release(seq.blocks, seq.promised)
            else:
                keep.append(seq)
        self.running = keep
        self.metrics.running.set(self.sequences)

    def take_all_waiting(self) -> list[Request]:
        with self.cond:
            waiting, self.waiting = list(self.waiting), collections.deque()
            self.metrics.queue_depth.set(0)
        return waiting
