"""The engine: the step loop on its own thread, and the asyncio API the front ends call.

A step retires finished or cancelled sequences, then runs one forward pass over the next
token of every running sequence and the next chunk of the prompts being read (scheduler.py),
side by side, so the weights are read once for both. Beside a decode step a chunk is sized to
add about half of what the step costs, so a long prompt does not stall the streams. Short
prompts that arrive during a pass are read whole between two of its layers, in a pass of
their own, so a newcomer waits for one layer rather than a step. With nothing to decode, a
pass reads prompts alone, up to `max_prefill_tokens`. After each forward pass the sampler picks one
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
from ..model import GPT, Group
from ..sampling import SamplingError
from ..tokenizer import Tokenizer
from . import kv_cache
from .cuda_graphs import DecodeGraphs
from .decode_plan import DecodePlan
from .sampler import Sampler, prompt_logprobs
from .scheduler import Chunk, EngineStopped, RequestTimeout, Scheduler
from .sequence import Completion, Prompt, Request, Sequence, TokenEvent

log = logging.getLogger("gpt2serve.engine")

MIN_CHUNK = 16  # prompt tokens read beside a decode step, at the least
STEP_STRETCH = 1.5  # a decode step with a prompt chunk in it aims at this many steps' time


def _average(mean: float, value: float) -> float:
    """An exponential moving average; the first value starts it."""
    return value if not mean else 0.8 * mean + 0.2 * value


class Outbox:
    """What the step thread has for the asyncio side, handed over in one call per event loop
    when flushed: a call per event woke the server's loop once per token of every stream.
    A call that is not streamed gets its events when a sequence ends (or fails): waking its
    loop for each token cost the step thread the GIL while that loop ran (1% of a batch-1
    CPU step, docs/benchmarks.md)."""

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


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch_size: int = 32,
                 max_queue: int = 256, request_timeout: float = 600.0,
                 max_len: int | None = None, max_n: int = 16,
                 max_prompt_chars: int = 32768, threads: int | None = None,
                 kv_cache_memory: int | None = None, block_size: int = 16,
                 max_prefill_tokens: int = 512, cuda_graphs: bool | None = None,
                 decode_plan: bool = True):
        """`cuda_graphs`: replay decode steps as CUDA graphs (engine/cuda_graphs.py); None
        means on CUDA. True on CPU runs the same padded fixed-shape steps, uncaptured (tests).
        `decode_plan`: without graphs, replay decode steps' kernel calls where our fp32 CPU
        kernels serve the model (engine/decode_plan.py)."""
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.context = min(max_len or cfg.n_positions, cfg.n_positions)
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
        param = next(model.parameters())
        self.device = param.device
        self.cache = kv_cache.allocate(cfg, param.dtype, self.device, block_size,
                                       kv_cache_memory, max_batch_size * self.context,
                                       self.context)
        self.scheduler = Scheduler(self.cache, max_batch_size, max_queue, request_timeout)
        self.sampler = Sampler(cfg.vocab_size, self.eos_id, self.device)
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.max_n, self.max_prompt_chars = min(max_n, max_batch_size), max_prompt_chars
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.graphs = self._decode_graphs() if cuda_graphs else None
        self.plan = (DecodePlan(model, self.cache, max_batch_size, self.context)
                     if decode_plan and self.graphs is None
                     and DecodePlan.serves(model, self.cache) else None)
        # Intra-op threads for the step thread. The model is built on a thread set to one
        # (checkpoint.load_for_engine) so that no OpenMP team left by loading competes with
        # the step thread's.
        self.threads = threads
        self._stopping = False  # abort everything and end the step loop
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()  # touched by the step thread only
        self._step_seconds = 0.0  # a decode step's time, with no prompt chunk in it
        # Prompt tokens to read beside a decode step. With CUDA graphs, any step with a
        # prompt chunk runs eagerly and costs several graph steps whatever its size (launches,
        # not tokens, take the time), so shrinking the chunk would only slow prompts down:
        # it stays at the most.
        self._chunk_tokens = max_prefill_tokens if self.graphs is not None else MIN_CHUNK

    def _decode_graphs(self) -> DecodeGraphs | None:
        """Decode steps as CUDA graphs, their padding rows cached in a block taken for good
        (None when the cache cannot spare one beside a full-context sequence)."""
        blocks = self.scheduler.blocks
        if blocks.available <= blocks.blocks_for(self.context):
            log.info("CUDA graphs off: the KV cache has no block to spare for padding rows")
            return None
        scratch = blocks.set_aside()
        return DecodeGraphs(self.model, self.cache, self.max_batch_size, self.context, scratch,
                            capture=self.device.type == "cuda")

    # ---- asyncio side ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop_or_die, name="gpt2serve-engine",
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
        while True:
            with self.scheduler.cond:  # a request moves from `waiting` to `prefilling` under it
                if not self.scheduler.busy:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        """End the step loop; whatever is still running or queued fails with EngineStopped.
        Waits up to `timeout` seconds for the step in flight to end."""
        with self.scheduler.cond:
            self.scheduler.closed = self._stopping = True
            self.scheduler.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    @property
    def alive(self) -> bool:
        """False once the step thread has ended without being stopped: nothing accepted can
        finish any more, so liveness must fail and the pod be restarted."""
        return self._stopping or self._thread is None or self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(waiting requests, running sequences, those whose prompt is being read included)."""
        return len(self.scheduler.waiting), self.scheduler.sequences

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
            vocab = self.model.config.vocab_size
            for name in ("logit_bias", "stop_token_ids"):
                outside = [t for t in getattr(prompt.params, name) if t >= vocab]
                if outside:
                    raise SamplingError(f"'{name}' names token {outside[0]}; the vocabulary "
                                        f"has {vocab}")
            max_new = prompt.params.max_new_for(len(prompt.ids), self.context)
            blocks = self.scheduler.blocks_needed(len(prompt.ids), max_new, prompt.params.n)
            capacity = self.scheduler.blocks.num_blocks  # (without a scratch block)
            if blocks > capacity:
                size = self.cache.block_size
                raise SamplingError(
                    f"'n' {prompt.params.n} sequences of up to {len(prompt.ids) + max_new} "
                    f"tokens need {blocks * size} tokens of KV cache; this server holds "
                    f"{capacity * size} (--kv_cache_memory)")
            return max_new
        except SamplingError as e:
            raise SamplingError(f"{prompt.name}: {e}" if prompt.name else str(e)) from None

    def submit(self, prompts: list[Prompt], streamed: bool = True) -> list[Request]:
        """Validate every prompt of a call, then queue all of them or none: SamplingError
        (naming the prompt), QueueFull or EngineStopped leave nothing behind. `streamed`
        False: the caller wants whole completions, and each sequence's events come together
        when it ends."""
        self.start()
        if not self.alive:
            raise EngineStopped("the engine's step thread has died")
        max_new = [self.check(p) for p in prompts]
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        requests = [Request(p, i, m, events, loop, streamed)
                    for i, (p, m) in enumerate(zip(prompts, max_new))]
        self.scheduler.add(requests)
        return requests

    async def stream(self, requests: list[Request]) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(prompt index, TokenEvent) for every sequence of a call's requests, as they come.

        An error in any of them ends the call. Leaving the iteration early (client gone,
        task cancelled, error) cancels all of them: they leave the batch at the next step."""
        remaining = sum(r.params.n for r in requests)
        running = [r.params.n for r in requests]  # each request's unfinished sequences
        try:
            while remaining:
                index, item = await requests[0].events.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                    running[index] -= 1
                    if not running[index]:
                        metrics.E2E_REQUEST_LATENCY.observe(
                            time.monotonic() - requests[index].arrival)
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
        async for p, ev in self.stream(self.submit(prompts, streamed=False)):
            out[p][ev.index].add(ev)
        return out

    # ---- step thread ----------------------------------------------------------------------

    def _loop_or_die(self) -> None:
        """The step loop; should anything but stop() end it (a BaseException: the loop
        isolates Exceptions), fail what was accepted rather than leave it waiting forever.
        `alive` turns false, so liveness fails and the pod is restarted."""
        try:
            self._loop()
        except BaseException as e:
            log.critical("the engine's step thread died: %r", e)
            died = EngineStopped("the engine's step thread has died")
            self._fail(died)
            for request in self.scheduler.take_all_waiting():
                self._outbox.put(request, died)
            self._outbox.flush()
            raise

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        sched = self.scheduler
        while True:
            with sched.cond:
                while not self._stopping and not sched.busy:
                    sched.cond.wait()
            if self._stopping:
                stopped = EngineStopped("server stopped")
                self._fail(stopped)
                for request in sched.take_all_waiting():
                    self._outbox.put(request, stopped)
                self._outbox.flush()
                return
            try:
                sched.drop_cancelled()
                sched.retire()
                self._step()
            except Exception as e:  # a failed step costs the running batch, never the server
                log.exception("engine step failed")
                self._fail(e)
            self._outbox.flush()

    def _fail(self, error: Exception) -> None:
        """Fail every request running or being prefilled (each once)."""
        sched = self.scheduler
        for request in {id(s.request): s.request for s in sched.running}.values():
            if not all(s.finish_reason for s in request.seqs):
                self._outbox.put(request, error)
            request.fail()
        sched.retire()
        for request in list(sched.prefilling):
            sched.drop_prefilling(request)
            self._outbox.put(request, error)

    def _step(self) -> None:
        """One forward pass: the next token of every running sequence and the next chunk of
        the prompts being read, side by side (the weights are read once for both). Short
        prompts that arrive during the pass are read whole in a pass of their own between
        two of its layers, and their first tokens go out at once: they wait for one layer,
        not for the step."""
        t0 = time.perf_counter()
        sched = self.scheduler
        batch = list(sched.running)
        sched.grow(batch)
        budget = self._chunk_tokens if batch else self.max_prefill_tokens
        chunks = self._next_chunks(budget) if sched.waiting or sched.prefilling else []
        if not batch and not chunks:
            return
        # Decode-only steps replay a fixed step: a CUDA graph, or on CPU a plan of kernel calls.
        graphed = self.graphs is not None and not chunks
        planned = self.plan is not None and not chunks
        tokens, positions, tables = ([s.tokens[-1] for s in batch],
                                     [s.length - 1 for s in batch], [s.blocks for s in batch])
        groups = []
        if batch and not (graphed or planned):
            groups.append(Group(self.cache, torch.tensor(tokens, device=self.device)[:, None],
                                torch.tensor(positions, device=self.device),
                                self._table(tables)))
        if chunks:
            groups.append(self._chunk_group(chunks))
        newcomers_seconds = 0.0

        def read_newcomers() -> None:  # once per step; nothing may be retired here
            nonlocal newcomers_seconds
            if sched.waiting and not newcomers_seconds:
                t = time.perf_counter()
                newcomers = self._next_chunks(budget, whole_new_prompts=True)
                if newcomers:
                    group = self._chunk_group(newcomers)
                    self._finish_step([], newcomers, self.model.forward(self.cache, [group]))
                    self._outbox.flush()
                newcomers_seconds = time.perf_counter() - t

        if graphed:  # prompts that arrived wait for the step, not a layer: it is short
            logits = self.graphs.run(tokens, positions, tables)
            read_newcomers()
            self._sample(logits, batch)
        elif planned:
            self._sample_planned(self.plan.run(tokens, positions, tables, read_newcomers), batch)
        else:
            hidden = self.model.forward(self.cache, groups, read_newcomers if batch else None)
            self._finish_step(batch, chunks, hidden)
        seconds = time.perf_counter() - t0 - newcomers_seconds
        if batch and not chunks:
            self._step_seconds = _average(self._step_seconds, seconds)
        elif batch and self.graphs is None:
            self._size_chunks(seconds)
        metrics.BATCH_SIZE.observe(len(batch))
        if batch:
            metrics.TIME_PER_TOKEN.observe(seconds)

    def _size_chunks(self, seconds: float) -> None:
        """Prompt tokens to read beside the next decode step (padding included): a quarter
        more while a step with a chunk takes at most STEP_STRETCH decode steps, less in
        proportion when it takes longer. Streams then wait at most about that much longer
        for a token while a long prompt is read, whatever the model, machine or context;
        growing by steps bounds what one noisy measurement can cost."""
        target = STEP_STRETCH * self._step_seconds
        if seconds <= target:
            grown = int(self._chunk_tokens * 1.25)
        else:
            grown = int(self._chunk_tokens * max(0.5, target / seconds))
        self._chunk_tokens = max(MIN_CHUNK, min(self.max_prefill_tokens, grown))

    def _next_chunks(self, budget: int, whole_new_prompts: bool = False) -> list[Chunk]:
        chunks, expired = self.scheduler.next_chunks(budget, whole_new_prompts)
        for request in expired:
            self._outbox.put(request, RequestTimeout(
                f"waited more than {self.scheduler.request_timeout:g}s for a free slot"))
        return chunks

    def _chunk_group(self, chunks: list[Chunk]) -> Group:
        width = max(c.length for c in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        for row, c in enumerate(chunks):
            tokens[row, :c.length] = torch.tensor(c.request.prompt_ids[c.start:c.start + c.length])
        return Group(self.cache, tokens.to(self.device),
                     torch.tensor([c.start for c in chunks], device=self.device),
                     self._table([c.request.blocks for c in chunks]),
                     torch.tensor([c.length for c in chunks], device=self.device))

    def _finish_step(self, batch: list[Sequence], chunks: list[Chunk],
                     hidden: list[torch.Tensor]) -> None:
        """Logits for the rows that need them, in one product: every decode row, the last
        row of each prompt read to its end, and every row of a prompt whose tokens are to
        be scored (OpenAI's echo with logprobs). Then prompts read to their end start their
        sequences, and the batch and the new sequences are sampled together."""
        picked = [hidden[0]] if batch else []
        scored, first_token_rows = [], {}  # chunk index -> its last row's logits
        if chunks:
            chunk_hidden = hidden[-1].view(len(chunks), -1, hidden[-1].shape[-1])
            offset = len(batch)
            for row, c in enumerate(chunks):
                if c.request.wants_prompt_logprobs is not None:
                    picked.append(chunk_hidden[row, :c.length])
                    scored.append((c, offset))
                    offset += c.length
                elif c.last:
                    picked.append(chunk_hidden[row, c.length - 1:c.length])
                    offset += 1
                if c.last:
                    first_token_rows[row] = offset - 1
        logits = self.model.logits(torch.cat(picked)) if picked else None
        for c, offset in scored:
            request = c.request
            following = request.prompt_ids[c.start + 1:c.start + c.length + 1]
            request.prompt_logprobs += prompt_logprobs(logits[offset:offset + c.length],
                                                       following, request.wants_prompt_logprobs)
        seqs, rows = list(batch), list(range(len(batch)))
        started = []
        for row, c in enumerate(chunks):
            if c.last:  # running before it leaves `prefilling`: never idle in between
                new = c.request.start(self.tokenizer, self.eos_id)
                self.scheduler.start(c.request, new)
                seqs += new
                rows += [first_token_rows[row]] * len(new)
                started.append(c.request)
            self.scheduler.read(c)
        if seqs:
            if rows != list(range(len(logits))):  # (a decode step's rows are all in order)
                logits = logits[torch.tensor(rows, device=self.device)]
            self._sample(logits, seqs)
        now = time.monotonic()
        for request in started:
            metrics.TIME_TO_FIRST_TOKEN.observe(now - request.arrival)

    def _table(self, block_lists: list[list[int]]) -> torch.Tensor:
        """Block tables [N, widest] (padding points at block 0 and is never attended to)."""
        width = max(map(len, block_lists))
        return torch.tensor([b + [0] * (width - len(b)) for b in block_lists],
                            device=self.device)

    def _sample_planned(self, hidden: torch.Tensor, batch: list[Sequence]) -> None:
        """Tokens for a planned decode step's rows. Where each row's token depends on its k
        largest logits alone (greedy decoding, top-k sampling), the head's screen computes
        just those (packing.HeadScreen): the same k largest logits for the sampler, from the
        head's int8 copy and the few panels that can hold them."""
        screen = self.model.head.screen
        fits = screen is not None and len(batch) <= screen.max_rows
        ks = self.sampler.largest_needed(batch) if fits else None
        logits = None
        if ks is not None and screen.promising(ks):
            logits = screen.logits(self.model.ln_f(hidden), ks)
            metrics.HEAD_SCREEN.labels("decided" if logits is not None else "full").inc()
        self._sample(self.model.logits(hidden) if logits is None else logits, batch)

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
        now = time.monotonic()
        for seq, s in zip(seqs, sampled):
            if seq.last_token_at is not None:
                metrics.INTER_TOKEN_LATENCY.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self._outbox.put(seq.request, seq.append(s))
