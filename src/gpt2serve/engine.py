"""The generation engine: requests, KV-cache slots, the continuous-batching scheduler, the step loop.

Requests wait in a bounded queue. A dedicated thread runs the step loop: between decode steps
it retires finished or cancelled sequences, admits waiting requests into free cache slots
(prefilling their prompts), then runs one batched decode step for every running sequence;
requests that arrive during that step are prefilled between two of its layers. A step's tokens
go back to the asyncio side together (`Outbox`, one `loop.call_soon_threadsafe`), so HTTP
handlers never block; torch releases the GIL inside its kernels, so the server stays
responsive meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from . import metrics
from .model import GPT, KVCache
from .sampling import SamplingError, SamplingParams, process_logits, sample, top_logprobs
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("gpt2serve.engine")

# Prompts prefilled in one forward pass are padded to the longest; this bounds padded tokens
# per pass (activation memory and the time other sequences wait for their next token).
PREFILL_TOKEN_BUDGET = 4096


class QueueFull(RuntimeError):
    """The waiting queue is at --max_queue; the client should retry later."""


class RequestTimeout(RuntimeError):
    """The request waited in the queue longer than --request_timeout."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new work."""


@dataclass
class TokenEvent:
    """One step of one sequence: a new token and the text it completed (may be empty)."""

    index: int  # which of the request's n sequences
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class Completion:
    """One finished sequence, accumulated from its TokenEvents."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, ev: TokenEvent) -> None:
        self.text += ev.text
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
                self.top_logprobs.append(ev.top_logprobs or [])
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason


class Sequence:
    def __init__(self, request: Request, index: int, generator: torch.Generator,
                 detokenizer: IncrementalDetokenizer):
        self.request, self.index, self.generator = request, index, generator
        self.detokenizer = detokenizer
        self.tokens: list[int] = []  # generated so far
        self.text = ""  # detokenized generated text
        self.emitted = 0  # characters of self.text already sent
        self.slot = -1
        self.finish_reason: str | None = None
        self.last_token_at: float | None = None  # monotonic; inter-token latency

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.tokens)


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_new: int,
                 loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.params, self.max_new = prompt_ids, params, max_new
        self.loop = loop
        self.events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.arrival = time.monotonic()
        self.cancelled = False
        self.seqs: list[Sequence] = []


class Outbox:
    """What the step thread has for the asyncio side, handed over in one call per event loop
    when flushed: a call per event woke the server's loop once per token of every stream."""

    def __init__(self) -> None:
        self._items: list[tuple[Request, TokenEvent | BaseException]] = []

    def put(self, request: Request, item: TokenEvent | BaseException) -> None:
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
        request.events.put_nowait(item)


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch_size: int = 32,
                 max_queue: int = 256, request_timeout: float = 600.0,
                 max_len: int | None = None, max_n: int = 16,
                 max_prompt_chars: int = 32768, threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.context = min(max_len or cfg.n_positions, cfg.n_positions)
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(cfg, max_batch_size, self.context, param.dtype, self.device)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.request_timeout = request_timeout
        self.max_n, self.max_prompt_chars = min(max_n, max_batch_size), max_prompt_chars
        # Intra-op threads for the step thread. Build the model on a thread set to one
        # (checkpoint.load_for_engine) and let the step thread have the cores: an OpenMP team
        # left by the loading thread slowed every step of another thread (fp32 GPT-2 124M
        # decode step 14.2-14.7 ms against 9.6-10.1 ms without it, 2 cores).
        self.threads = threads
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Sequence] = []  # running[i] lives in cache slot i
        self._prefilling: list[Request] = []  # out of `waiting`, not yet `running`
        self._wake = threading.Condition()
        self._draining = False  # refuse new work, finish what was accepted
        self._stopping = False  # abort everything and end the step loop
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()  # touched by the step thread only
        log.info("KV cache: %d slots x %d tokens, %.1f MiB (%s on %s)", max_batch_size,
                 self.context, self.cache.nbytes / 2**20, param.dtype, self.device)

    # ---- asyncio side ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop_or_die, name="gpt2serve-engine",
                                            daemon=True)
            self._thread.start()

    def drain(self) -> None:
        """Graceful shutdown, first half: new requests get EngineStopped (503), accepted ones
        (running or queued) carry on."""
        with self._wake:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is running or queued, or `timeout` passes; True if idle."""
        deadline = time.monotonic() + timeout
        while True:
            with self._wake:  # a request moves from `waiting` to `_prefilling` under it
                if not (self.waiting or self._prefilling or self.running):
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        """End the step loop; whatever is still running or queued fails with EngineStopped.
        Waits up to `timeout` seconds for the step in flight to end."""
        with self._wake:
            self._draining = self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    @property
    def alive(self) -> bool:
        """False once the step thread has ended without being stopped: nothing accepted can
        finish any more, so liveness must fail and the pod be restarted."""
        return self._stopping or self._thread is None or self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(waiting requests, running sequences)."""
        return len(self.waiting), len(self.running)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt; an empty one starts from <|endoftext|>, as GPT-2 was trained."""
        if len(text) > self.max_prompt_chars:
            # Checked before tokenizing, which costs time in proportion to the text.
            raise SamplingError(f"prompt is {len(text)} characters; this server takes at most "
                                f"{self.max_prompt_chars} (--max_prompt_chars)")
        ids = self.tokenizer.encode(text)
        if not ids:
            if self.eos_id is None:
                raise SamplingError("prompt is empty and the model has no <|endoftext|> token")
            ids = [self.eos_id]
        return ids

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate lengths for this engine; returns the number of new tokens to generate."""
        if params.n > self.max_n:
            raise SamplingError(f"'n' must be in [1, {self.max_n}], got {params.n}")
        return params.max_new_for(len(prompt_ids), self.context)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request, or refuse it at once (SamplingError, QueueFull, EngineStopped)."""
        self.start()
        max_new = self.check_prompt(prompt_ids, params)
        request = Request(prompt_ids, params, max_new, asyncio.get_running_loop())
        with self._wake:
            if self._draining:
                raise EngineStopped("server is shutting down")
            if not self.alive:
                raise EngineStopped("the engine's step thread has died")
            # Requests that free slots will take at the next step do not count as queued.
            free_slots = max(0, self.max_batch_size - len(self.running))
            if len(self.waiting) >= self.max_queue + free_slots:
                metrics.REJECTED.inc()
                raise QueueFull(f"queue is full ({self.max_queue} waiting requests)")
            self.waiting.append(request)
            metrics.QUEUE_DEPTH.set(len(self.waiting))
            self._wake.notify()
        return request

    async def events(self, request: Request) -> AsyncIterator[TokenEvent]:
        """TokenEvents of all n sequences of a submitted request, as they come.

        Leaving the iteration early (client gone, task cancelled) cancels the request: its
        sequences leave the batch at the next step."""
        remaining = request.params.n
        try:
            while remaining:
                item = await request.events.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                    if not remaining:
                        metrics.E2E_REQUEST_LATENCY.observe(time.monotonic() - request.arrival)
                yield item
        finally:
            if remaining:
                self.cancel(request)

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> list[Completion]:
        """Generate for one prompt and return its n finished completions."""
        out = [Completion(i) for i in range(params.n)]
        async for ev in self.events(self.submit(prompt_ids, params)):
            out[ev.index].add(ev)
        return out

    # ---- engine thread --------------------------------------------------------------------

    def _loop_or_die(self) -> None:
        """The step loop; should anything end it but stop() (a BaseException: the loop
        isolates Exceptions), fail what was accepted rather than leave it waiting forever.
        `alive` turns false, so liveness fails and the pod is restarted."""
        try:
            self._loop()
        except BaseException as e:
            log.critical("the engine's step thread died: %r", e)
            died = EngineStopped("the engine's step thread has died")
            with self._wake:
                requests = [*self.waiting, *self._prefilling,
                            *(s.request for s in self.running)]
                self.waiting.clear()
            for request in {id(r): r for r in requests}.values():
                self._outbox.put(request, died)
            self._outbox.flush()
            raise

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    stopped = EngineStopped("server stopped")
                    self._fail_running(stopped)
                    for request in self.waiting:
                        self._outbox.put(request, stopped)
                    self.waiting.clear()
                    self._outbox.flush()
                    return
            try:
                self._retire_cancelled()
                self._admit()
                self._retire()
                if self.running:
                    self._decode()
            except Exception as e:  # a failed step costs the running batch, never the server
                log.exception("engine step failed")
                self._fail_running(e)
            self._outbox.flush()

    def _fail_running(self, error: Exception) -> None:
        for request in {id(s.request): s.request for s in self.running}.values():
            self._outbox.put(request, error)
            self._mark_failed(request)
        self._retire()

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self.running if s.request.cancelled]:
            seq.finish_reason = "abort"
            metrics.ABORTED.inc()
        self._retire()
        with self._wake:
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                metrics.ABORTED.inc(sum(r.params.n for r in gone))
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> None:
        """Move waiting requests into free slots, FIFO, and prefill them together."""
        now = time.monotonic()
        batch, expired, free = [], [], self.max_batch_size - len(self.running)
        with self._wake:
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
                metrics.REQUEST_QUEUE_TIME.observe(now - request.arrival)
                metrics.PROMPT_TOKENS.inc(len(request.prompt_ids))
            metrics.QUEUE_DEPTH.set(len(self.waiting))
            self._prefilling = batch  # so that wait_idle does not see an idle engine
        for request in expired:
            self._outbox.put(request, RequestTimeout(
                f"waited more than {self.request_timeout:g}s for a free slot"))
        if not batch:
            return
        try:
            self._prefill(batch)
        except Exception as e:  # failing requests must not take the engine down
            log.exception("prefill failed")
            for request in batch:
                self._mark_failed(request)
                self._outbox.put(request, e)
        finally:
            self._prefilling = []

    def _prefill(self, batch: list[Request]) -> None:
        """One forward pass over the batch's prompts; each request's first sequence goes to
        the next slot in order, its siblings (n > 1) after all of them, sharing its prompt."""
        first = len(self.running)
        lengths = [len(r.prompt_ids) for r in batch]
        tokens = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        for row, request in enumerate(batch):
            tokens[row, :lengths[row]] = torch.tensor(request.prompt_ids)
        logits = self.model.prefill(tokens.to(self.device), self.cache, first,
                                    torch.tensor(lengths, device=self.device)).cpu()
        seqs = []
        for row, request in enumerate(batch):
            for i, gen in enumerate(request.params.generators()):
                detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
                seq = Sequence(request, i, gen, detok)
                request.seqs.append(seq)
                seqs.append((seq, row))
        seqs.sort(key=lambda item: item[0].index > 0)  # first sequences keep slots first..
        for seq, row in seqs:
            seq.slot = len(self.running)
            if seq.index:
                self.cache.move(first + row, seq.slot, lengths[row])
            self.running.append(seq)
            self._advance_or_fail(seq, logits[row])
        self._outbox.flush()  # first tokens go out now, even if a decode step is in flight
        now = time.monotonic()
        for request in batch:
            metrics.TIME_TO_FIRST_TOKEN.observe(now - request.arrival)

    def _decode(self) -> None:
        """One decode step for the running batch. Requests that arrive meanwhile are admitted
        once, between two of its layers (into the slots after the batch): a newcomer's first
        token waits for one layer of the step in flight, not the whole step, while requests
        arriving together still share a prefill at the next step."""
        t0 = time.perf_counter()
        batch = list(self.running)
        admitted = False

        def admit_arrivals() -> None:  # nothing may be retired here: slots stay as they are
            nonlocal admitted
            if not admitted and self.waiting and len(self.running) < self.max_batch_size:
                admitted = True
                self._admit()

        tokens = torch.tensor([s.tokens[-1] for s in batch], device=self.device)
        pos = torch.tensor([s.length - 1 for s in batch], device=self.device)
        logits = self.model.decode_step(tokens, pos, self.cache, admit_arrivals).cpu()
        for seq, row in zip(batch, logits):
            self._advance_or_fail(seq, row)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.TIME_PER_TOKEN.observe(time.perf_counter() - t0)
        self._retire()

    def _advance_or_fail(self, seq: Sequence, raw: torch.Tensor) -> None:
        """_advance, where an error fails this sequence's request alone."""
        if seq.finish_reason:
            return  # a sibling sequence already failed
        try:
            self._advance(seq, raw)
        except Exception as e:
            log.exception("sampling failed")
            self._outbox.put(seq.request, e)
            self._mark_failed(seq.request)

    def _advance(self, seq: Sequence, raw: torch.Tensor) -> None:
        """Sample one token for `seq` from its logits row, detokenize, check stops, emit."""
        params, request = seq.request.params, seq.request
        raw = raw.float().cpu()
        history = None
        if params.repetition_penalty != 1.0:
            history = torch.tensor(request.prompt_ids + seq.tokens)
        logits = process_logits(raw.clone(), params, history, seq.length, self.eos_id)
        token = sample(logits, params, seq.generator)
        logprob = top = None
        if params.logprobs is not None:
            logprob, top = top_logprobs(raw, token, params.logprobs)
        metrics.TOKENS_GENERATED.inc()
        now = time.monotonic()
        if seq.last_token_at is not None:
            metrics.INTER_TOKEN_LATENCY.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if token == self.eos_id and not params.ignore_eos:
            token = None  # EOS ends the sequence; it is not part of the text
            seq.finish_reason = "stop"
            seq.text += seq.detokenizer.flush()
        else:
            seq.tokens.append(token)
            seq.text += seq.detokenizer.push(token)
            if len(seq.tokens) >= request.max_new:
                seq.finish_reason = "length"
                seq.text += seq.detokenizer.flush()
        self._check_stop_strings(seq)
        hold = 0 if seq.finish_reason else max((len(s) for s in params.stop), default=1) - 1
        end = max(seq.emitted, len(seq.text) - hold)
        delta, seq.emitted = seq.text[seq.emitted:end], end
        self._outbox.put(request, TokenEvent(seq.index, token, delta, logprob, top,
                                             seq.finish_reason))

    @staticmethod
    def _check_stop_strings(seq: Sequence) -> None:
        stops = seq.request.params.stop
        if not stops:
            return
        # Only text that is new since the last emission (plus overlap) can hold a new match.
        start = max(0, seq.emitted - max(len(s) for s in stops))
        hits = [i for i in (seq.text.find(s, start) for s in stops) if i >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
            seq.emitted = min(seq.emitted, len(seq.text))
            seq.finish_reason = "stop"

    def _retire(self) -> None:
        """Drop finished sequences and keep the rest packed in slots 0..B-1."""
        keep = [s for s in self.running if not s.finish_reason]
        if len(keep) != len(self.running):
            for new_slot, seq in enumerate(keep):
                if seq.slot != new_slot:
                    self.cache.move(seq.slot, new_slot, seq.length - 1)
                    seq.slot = new_slot
            self.running = keep
        metrics.RUNNING.set(len(self.running))

    @staticmethod
    def _mark_failed(request: Request) -> None:
        for seq in request.seqs:
            seq.finish_reason = seq.finish_reason or "error"
