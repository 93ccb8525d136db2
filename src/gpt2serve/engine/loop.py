"""The engine's life: the step thread, and the asyncio API the front ends call.

A step retires finished or cancelled sequences, asks the scheduler what runs next (the next
token of every running sequence and the next chunks of the prompts being read, side by side,
so the weights are read once for both), has the runner chosen at load run and sample it
(runner.py), and delivers what came out: the scheduler's state changes, then each sequence's
text and events. Short prompts that arrive during a pass are read whole between two of its
layers, in a pass of their own, so a newcomer waits for one layer rather than a step. A step's
events go back to the asyncio side together (outbox.py), so HTTP handlers never block; torch
releases the GIL inside its kernels, so the server stays responsive meanwhile.

The whole step runs in torch's inference mode, on the step thread or, for tests that fix the
schedule (arrivals by step number), on the caller's (`threaded=False`, `step()`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable

import torch

from .. import metrics
from ..model import GPT
from ..sampling import SamplingError
from ..tokenizer import Tokenizer
from . import kv_cache
from .config import EngineConfig
from .outbox import Outbox
from .runner import EagerRunner, StepOutput, choose_runner
from .sampler import Sampler
from .scheduler import (ChunkBudget, EngineError, EngineStopped, RequestTimeout,
                        ScheduledStep, Scheduler)
from .sequence import Completion, Prompt, Request, TokenEvent

log = logging.getLogger("gpt2serve.engine")


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 runner: str | None = None, threaded: bool = True):
        """`runner` forces one of runner.RUNNERS (tests, benchmarks); by default the fastest
        that serves the model (runner.choose_runner). `threaded` False: no step thread;
        the caller runs each step (`step()`)."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = model.config
        self.context = min(config.max_model_len or cfg.n_positions, cfg.n_positions)
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
        param = next(model.parameters())
        self.device = param.device
        self.cache = kv_cache.allocate(cfg, param.dtype, self.device, config.block_size,
                                       config.kv_cache_memory,
                                       config.max_batch_size * self.context, self.context)
        sampler = Sampler(cfg.vocab_size, self.eos_id, self.device)
        blocks = kv_cache.BlockManager(self.cache.num_blocks, self.cache.block_size)
        self.runner: EagerRunner = choose_runner(model, self.cache, sampler, blocks,
                                                 config.max_batch_size, self.context,
                                                 config.enforce_eager, runner)
        log.info("runner: %s (%s)", self.runner.name, self.runner.describe())
        budget = ChunkBudget(config.max_prefill_tokens,
                             adaptive=self.runner.name != "cuda-graphs")
        self.scheduler = Scheduler(self.cache, blocks, tokenizer, self.eos_id,
                                   config.max_batch_size, config.max_queue,
                                   config.request_timeout, budget,
                                   config.enable_prefix_caching)
        self.max_n = min(config.max_n, config.max_batch_size)
        self.max_prompt_chars = config.max_prompt_chars
        self.threaded = threaded
        self._stopping = False  # abort everything and end the step loop
        self._thread: threading.Thread | None = None
        self._outbox = Outbox()  # touched by the step thread only

    # ---- asyncio side ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and self.threaded:
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
            self.scheduler.check_capacity(len(prompt.ids), max_new, prompt.params.n)
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
            with torch.inference_mode():
                if self.config.threads:
                    torch.set_num_threads(self.config.threads)
                self._loop()
        except BaseException as e:
            log.critical("the engine's step thread died: %r", e)
            self._fail(EngineStopped("the engine's step thread has died"), waiting=True)
            raise

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with sched.cond:
                while not self._stopping and not sched.busy:
                    sched.cond.wait()
            if self._stopping:
                self._fail(EngineStopped("server stopped"), waiting=True)
                return
            self._step()

    def step(self, arrivals: Callable[[], None] | None = None) -> None:
        """One step on the caller's thread (`threaded=False`), so that tests fix the schedule:
        they submit arrivals between steps, and `arrivals` runs between two layers of the
        step's pass (where prompts that arrive during a pass are read), and may submit more."""
        with torch.inference_mode():
            self._step(arrivals)

    def _step(self, arrivals: Callable[[], None] | None = None) -> None:
        """Retire what ended, then run the next step; a failure costs the requests in it,
        never the engine."""
        sched = self.scheduler
        try:
            sched.drop_cancelled()
            sched.retire()
            t0 = time.perf_counter()
            step = sched.schedule()
            self._expire(step)
            if step:
                newcomers = _Newcomers(self, sched.budget.tokens(bool(step.decode)), arrivals)
                out = self.runner.execute(step, newcomers.read)
                self._deliver(step, out)
                seconds = time.perf_counter() - t0 - newcomers.seconds
                sched.budget.observe(step, seconds)
                metrics.BATCH_SIZE.observe(len(step.decode))
                if step.decode:
                    metrics.TIME_PER_TOKEN.observe(seconds)
        except Exception:  # a failed step costs the running batch, never the server
            log.exception("engine step failed")
            self._fail(EngineError())
        self._outbox.flush()

    def _expire(self, step: ScheduledStep) -> None:
        for request in step.expired:
            self._outbox.put(request, RequestTimeout(
                f"waited more than {self.config.request_timeout:g}s for a free slot"))

    def _deliver(self, step: ScheduledStep, out: StepOutput) -> None:
        """The scheduler takes the step's outcome (chunks read, sequences started), then each
        sampled sequence its token, and the events go to the outbox."""
        self.scheduler.update(step, out.prompt_logprobs, [seq for seq, _ in out.failed])
        for seq, _ in out.failed:
            self._outbox.put(seq.request, EngineError())
        metrics.TOKENS_GENERATED.inc(len(out.rows))
        now = time.monotonic()
        for seq, sampled in zip(out.rows, out.sampled):
            if seq.last_token_at is not None:
                metrics.INTER_TOKEN_LATENCY.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self._outbox.put(seq.request, seq.append(sampled))
        for request in {id(s.request): s.request for s in step.started}.values():
            metrics.TIME_TO_FIRST_TOKEN.observe(now - request.arrival)

    def _fail(self, error: Exception, waiting: bool = False) -> None:
        """Fail every request running or being prefilled, and waiting if asked."""
        for request in self.scheduler.abort(waiting):
            self._outbox.put(request, error)
        self._outbox.flush()


class _Newcomers:
    """Prompts that arrive during a step's pass, read whole in a pass of their own between two
    of its layers (once per step), their first tokens sent at once."""

    def __init__(self, engine: Engine, budget: int, arrivals: Callable[[], None] | None):
        self.engine, self.budget, self.arrivals, self.seconds = engine, budget, arrivals, 0.0

    def read(self) -> None:  # nothing may be retired here
        engine = self.engine
        if self.arrivals is not None:
            self.arrivals()
        if self.seconds or not engine.scheduler.waiting:
            return
        t = time.perf_counter()
        step = engine.scheduler.schedule_newcomers(self.budget)
        engine._expire(step)
        if step:
            engine._deliver(step, engine.runner.execute(step))
        engine._outbox.flush()
        self.seconds = time.perf_counter() - t
