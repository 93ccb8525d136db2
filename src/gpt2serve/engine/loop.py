"""The engine: the step loop on its own thread, and the asyncio API the front ends call.

A step retires finished or cancelled sequences, prefills the requests the scheduler admits,
then runs one batched decode step for every running sequence; requests that arrive during that
step are prefilled between two of its layers. After each forward pass the sampler picks one
token per sequence, and each sequence turns its token into text. A step's events go back to
the asyncio side together (`Outbox`, one `loop.call_soon_threadsafe`), so HTTP handlers never
block; torch releases the GIL inside its kernels, so the server stays responsive meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator

import torch

from .. import metrics
from ..model import GPT, KVCache
from ..sampling import SamplingError
from ..tokenizer import Tokenizer
from .sampler import Sampler
from .scheduler import EngineStopped, RequestTimeout, Scheduler
from .sequence import Completion, Prompt, Request, Sequence, TokenEvent

log = logging.getLogger("gpt2serve.engine")


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
        request.events.put_nowait((request.index, item))


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
        self.scheduler = Scheduler(self.cache, max_batch_size, max_queue, request_timeout)
        self.sampler = Sampler(cfg.vocab_size, self.eos_id, self.device)
        self.max_batch_size = max_batch_size
        self.max_n, self.max_prompt_chars = min(max_n, max_batch_size), max_prompt_chars
        # Intra-op threads for the step thread. The model is built on a thread set to one
        # (checkpoint.load_for_engine) so that no OpenMP team left by loading competes with
        # the step thread's.
        self.threads = threads
        self._stopping = False  # abort everything and end the step loop
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()  # touched by the step thread only
        log.info("KV cache: %d slots x %d tokens, %.1f MiB (%s on %s)", max_batch_size,
                 self.context, self.cache.nbytes / 2**20, param.dtype, self.device)

    # ---- asyncio side ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpt2serve-engine",
                                            daemon=True)
            self._thread.start()

    def drain(self) -> None:
        """Graceful shutdown, first half: new requests get EngineStopped (503), accepted ones
        (running or queued) carry on."""
        with self.scheduler.cond:
            self.scheduler.closed = True

    @property
    def draining(self) -> bool:
        return self.scheduler.closed

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is running or queued, or `timeout` passes; True if idle."""
        deadline = time.monotonic() + timeout
        while self.scheduler.waiting or self.scheduler.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """End the step loop; whatever is still running or queued fails with EngineStopped."""
        with self.scheduler.cond:
            self.scheduler.closed = self._stopping = True
            self.scheduler.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def load(self) -> tuple[int, int]:
        """(waiting requests, running sequences)."""
        return len(self.scheduler.waiting), len(self.scheduler.running)

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

    def check(self, prompt: Prompt) -> int:
        """Validate a prompt for this engine; returns the number of new tokens to generate."""
        try:
            if prompt.params.n > self.max_n:
                raise SamplingError(f"'n' must be in [1, {self.max_n}], got {prompt.params.n}")
            return prompt.params.max_new_for(len(prompt.ids), self.context)
        except SamplingError as e:
            raise SamplingError(f"{prompt.name}: {e}" if prompt.name else str(e)) from None

    def submit(self, prompts: list[Prompt]) -> list[Request]:
        """Validate every prompt of a call, then queue all of them or none: SamplingError
        (naming the prompt), QueueFull or EngineStopped leave nothing behind."""
        self.start()
        max_new = [self.check(p) for p in prompts]
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        requests = [Request(p, i, m, events, loop)
                    for i, (p, m) in enumerate(zip(prompts, max_new))]
        self.scheduler.add(requests)
        return requests

    async def stream(self, requests: list[Request]) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(prompt index, TokenEvent) for every sequence of a call's requests, as they come.

        An error in any of them ends the call. Leaving the iteration early (client gone,
        task cancelled, error) cancels all of them: they leave the batch at the next step."""
        remaining = sum(r.params.n for r in requests)
        try:
            while remaining:
                index, item = await requests[0].events.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield index, item
        finally:
            if remaining:
                self.cancel(requests)

    def cancel(self, requests: list[Request]) -> None:
        for request in requests:
            request.cancelled = True
        self.scheduler.wake()

    async def complete(self, prompts: list[Prompt]) -> list[list[Completion]]:
        """Generate for a call's prompts; the n finished completions of each."""
        out = [[Completion(i) for i in range(p.params.n)] for p in prompts]
        async for p, ev in self.stream(self.submit(prompts)):
            out[p][ev.index].add(ev)
        return out

    # ---- step thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        sched = self.scheduler
        while True:
            with sched.cond:
                while not self._stopping and not sched.waiting and not sched.running:
                    sched.cond.wait()
            if self._stopping:
                stopped = EngineStopped("server stopped")
                self._fail(sched.running, stopped)
                for request in sched.take_all_waiting():
                    self._outbox.put(request, stopped)
                self._outbox.flush()
                return
            try:
                sched.drop_cancelled()
                sched.retire()
                self._admit()
                sched.retire()  # sequences that ended on their first token
                if sched.running:
                    self._decode()
            except Exception as e:  # a failed step costs the running batch, never the server
                log.exception("engine step failed")
                self._fail(sched.running, e)
            self._outbox.flush()

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        """Fail the requests of these sequences (each once), then retire them."""
        for request in {id(s.request): s.request for s in seqs}.values():
            if not all(s.finish_reason for s in request.seqs):
                self._outbox.put(request, error)
            request.fail()
        self.scheduler.retire()

    def _admit(self) -> None:
        batch, expired = self.scheduler.next_prefill()
        for request in expired:
            self._outbox.put(request, RequestTimeout(
                f"waited more than {self.scheduler.request_timeout:g}s for a free slot"))
        if not batch:
            return
        try:
            self._prefill(batch)
        except Exception as e:  # failing requests must not take the engine down
            log.exception("prefill failed")
            for request in batch:
                request.fail()
                self._outbox.put(request, e)

    def _prefill(self, batch: list[Request]) -> None:
        """One forward pass over the batch's prompts, into the slots after the running ones;
        then every new sequence (siblings share their prompt's logits) gets its first token."""
        first = len(self.scheduler.running)
        lengths = [len(r.prompt_ids) for r in batch]
        tokens = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        for row, request in enumerate(batch):
            tokens[row, :lengths[row]] = torch.tensor(request.prompt_ids)
        logits = self.model.prefill(tokens.to(self.device), self.cache, first,
                                    torch.tensor(lengths, device=self.device))
        placed = self.scheduler.place(batch, [r.start(self.tokenizer, self.eos_id)
                                              for r in batch])
        rows = torch.tensor([row for _, row in placed], device=self.device)
        self._sample(logits[rows], [seq for seq, _ in placed])
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
        sched = self.scheduler
        batch = list(sched.running)
        admitted = False

        def admit_arrivals() -> None:  # nothing may be retired here: slots stay as they are
            nonlocal admitted
            if not admitted and sched.waiting and len(sched.running) < sched.max_batch_size:
                admitted = True
                self._admit()

        tokens = torch.tensor([s.tokens[-1] for s in batch], device=self.device)
        pos = torch.tensor([s.length - 1 for s in batch], device=self.device)
        logits = self.model.decode_step(tokens, pos, self.cache, admit_arrivals)
        self._sample(logits, batch)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.TIME_PER_TOKEN.observe(time.perf_counter() - t0)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """A token for each sequence from its row of logits, in one batched pass. Should that
        pass fail, each row is retried alone, so only the requests that fail are failed."""
        live = [i for i, s in enumerate(seqs) if not s.finish_reason]  # siblings may have failed
        if len(live) < len(seqs):
            logits, seqs = logits[torch.tensor(live, device=logits.device)], [seqs[i] for i in live]
        try:
            sampled = self.sampler.sample(logits, seqs)
        except Exception as e:
            if len(seqs) > 1:
                log.exception("batched sampling failed; sampling each sequence alone")
                for i, seq in enumerate(seqs):
                    self._sample(logits[i:i + 1], [seq])
            else:
                log.exception("sampling failed")
                self._outbox.put(seqs[0].request, e)
                seqs[0].request.fail()
            return
        metrics.TOKENS_GENERATED.inc(len(seqs))
        for seq, s in zip(seqs, sampled):
            self._outbox.put(seq.request, seq.append(s))
