"""The engine's life: the step thread, and the asyncio API the front ends call.

A step retires finished or cancelled sequences, asks the scheduler what runs next (the next
token of every running sequence and the next chunks of the prompts being read, side by side,
so the weights are read once for both), has the runner chosen at load run and sample it
(runner.py), and delivers what came out: the scheduler's state changes, then each sequence's
text and events. Short prompts that arrive during a pass are read whole between two of its
layers, in a pass of their own, so a newcomer waits for one layer rather than a step. A step's
events go back to the asyncio side together (outbox.py), so HTTP handlers never block; torch
releases the GIL inside its kernels, so the server stays responsive meanwhile.

The whole step runs in torch's inference mode, on the step thread (step_loop.py: one
model's, or shared by every model a server has loaded) or, for tests that fix the schedule
(arrivals by step number), on the caller's (`threaded=False`, `step()`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

import torch

from .. import metrics
from ..model import GPT
from ..quantize import Int8TiedHead
from ..sampling import SamplingError
from ..tokenizer import Tokenizer
from . import kv_cache
from .config import EngineConfig
from .outbox import Outbox
from .runner import EagerRunner, StepOutput, choose_runner
from .sampler import Sampler
from .scheduler import (SHUTTING_DOWN, ChunkBudget, EngineError, EngineStopped,
                        ScheduledStep, Scheduler, streams)
from .sequence import Completion, Prompt, Request, TokenEvent
from .step_loop import StepLoop

log = logging.getLogger("gpt2serve.engine")


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 runner: str | None = None, threaded: bool = True, name: str = "",
                 loop: StepLoop | None = None):
        """`runner` forces one of runner.RUNNERS (tests, benchmarks); by default the fastest
        that serves the model (runner.choose_runner). `threaded` False: no step thread;
        the caller runs each step (`step()`). `name` labels the metrics. `loop`: the step
        thread shared with other engines (a server's models); by default one of its own."""
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        self.metrics = metrics.ModelMetrics(name)
        cfg = model.config
        self.context = config.context(cfg.n_positions)
        if config.max_model_len and config.max_model_len > self.context:  # (said, not hidden)
            log.warning("--max_model_len %d is more than this model's context: its sequences "
                        "take %d tokens at most", config.max_model_len, self.context)
        self.threaded = threaded
        self.loop = (loop or StepLoop(config.threads)) if threaded else None
        # as transformers: the model's end-of-text token (generation_config.json's, else
        # config.json's), the tokenizer's <|endoftext|> only for a model that names none
        self.eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_id
        param = next(model.parameters())
        self.device = param.device
        quantized = isinstance(model.head, Int8TiedHead)  # int8 and int4 models alike
        self.cache = kv_cache.allocate(cfg, config.cache_dtype(param.dtype, quantized),
                                       self.device, config.block(self.context),
                                       config.kv_cache_memory,
                                       config.max_batch_size, self.context)
        sampler = Sampler(cfg.vocab_size, self.eos_id, self.device)
        blocks = kv_cache.BlockManager(self.cache.num_blocks, self.cache.block_size,
                                       self.metrics)
        self.runner: EagerRunner = choose_runner(model, self.cache, sampler, blocks,
                                                 config.max_batch_size, self.context,
                                                 config.enforce_eager, runner)
        log.info("runner: %s (%s)", self.runner.name, self.runner.describe())
        budget = ChunkBudget(config.max_prefill_tokens,
                             adaptive=self.runner.name != "cuda-graphs",
                             stretch=config.prefill_step_stretch)
        self.scheduler = Scheduler(self.cache, blocks, tokenizer, self.eos_id,
                                   config.max_batch_size, config.max_queue,
                                   config.request_timeout, budget,
                                   config.enable_prefix_caching,
                                   cond=None if self.loop is None else self.loop.cond)
        self.metrics.kv_cache_capacity.set(blocks.num_blocks * blocks.block_size)
        self.max_n = min(config.max_n, config.max_batch_size)
        self.max_prompt_chars = config.max_prompt_chars
        self._stopping = False  # abort everything and leave the step loop
        self._outbox = Outbox()  # touched by the step thread only

    # ---- asyncio side ---------------------------------------------------------------------

    def start(self) -> None:
        if self.loop is not None and not self._stopping:
            self.loop.attach(self)

    def drain(self) -> None:
        """Graceful shutdown, first half: new requests get EngineStopped (503), accepted ones
        (running or queued) carry on."""
        with self.scheduler.cond:
            self.scheduler.closed = SHUTTING_DOWN

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
            self.scheduler.closed, self._stopping = SHUTTING_DOWN, True
            attached = self.loop is not None and self in self.loop.engines
            if not attached:
                self._fail(lambda: EngineStopped("server stopped"), waiting=True)
        if attached:
            self.loop.detach(self, timeout)

    @property
    def alive(self) -> bool:
        """False once the step thread has ended without being stopped: nothing accepted can
        finish any more, so liveness must fail and the pod be restarted."""
        return self._stopping or self.loop is None or not self.loop.died

    @property
    def memory_bytes(self) -> int:
        """What unloading this engine frees: its weights (the LM head's int8 screen
        included) and its KV cache."""
        screen = getattr(self.runner, "screen", None)
        return (self.model.weight_bytes() + (screen.nbytes if screen is not None else 0)
                + self.cache.nbytes)

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
        fit = self.scheduler.max_queue + self.config.max_batch_size
        if len(prompts) > fit:  # (QueueFull's retry would never succeed)
            raise SamplingError(f"a call of {len(prompts)} prompts cannot be queued: at most "
                                f"{fit} fit (--max_queue + --max_batch_size)")
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
        failed = False
        try:
            while remaining:
                index, item = await requests[0].events.get()
                if isinstance(item, BaseException):
                    failed = True
                    try:
                        raise item
                    finally:  # (this frame, in the error's traceback, would hold the error:
                        item = None  # a cycle only a full collection frees, with the request)
                if item.finish_reason is not None:
                    remaining -= 1
                    running[index] -= 1
                    if not running[index]:
                        self.metrics.e2e_request_latency.observe(
                            time.monotonic() - requests[index].arrival)
                yield index, item
        finally:
            if remaining:
                self.cancel(requests, failed)

    def cancel(self, requests: list[Request], failed: bool = False) -> None:
        """The requests leave at the next step; counted as aborted (their client gone)
        unless `failed`: the call ended on an error of one of them, which its client gets."""
        for request in requests:
            if not request.cancelled:
                # (failed_beside first: the step thread reads cancelled, then it)
                request.failed_beside = failed
                request.cancelled = True
        self.scheduler.wake()

    async def complete(self, prompts: list[Prompt]) -> list[list[Completion]]:
        """Generate for a call's prompts; the n finished completions of each."""
        out = [[Completion(i) for i in range(p.params.n)] for p in prompts]
        async for p, ev in self.stream(self.submit(prompts, streamed=False)):
            out[p][ev.index].add(ev)
        return out

    # ---- step thread ----------------------------------------------------------------------

    def step(self, arrivals: Callable[[], None] | None = None,
             neighbours: list[Engine] = ()) -> None:
        """One step on the caller's thread (`threaded=False`), so that tests fix the schedule:
        they submit arrivals between steps, and `arrivals` runs between two layers of the
        step's pass (where prompts that arrive during a pass, for this engine or its
        `neighbours`, are read), and may submit more."""
        with torch.inference_mode():
            self._step(arrivals, neighbours)

    def _step(self, arrivals: Callable[[], None] | None = None,
              neighbours: list[Engine] = ()) -> None:
        """Retire what ended, then run the next step; a failure costs the requests in it,
        never the engine. Prompts that arrive for this engine or its `neighbours` (the
        other engines of its StepLoop) during the pass are read between two of its layers."""
        sched = self.scheduler
        try:
            sched.drop_cancelled()
            sched.retire()
            t0 = time.perf_counter()
            step = sched.schedule(any(streams(e.scheduler.running) for e in neighbours))
            if step:
                newcomers = _Newcomers(self, step.streams, arrivals, neighbours)
                out = self.runner.execute(step, newcomers.read)
                self._deliver(step, out)
                seconds = time.perf_counter() - t0 - newcomers.seconds
                sched.budget.observe(step, seconds)
                if step.decode:  # (a step that only reads prompts has no decode batch)
                    self.metrics.batch_size.observe(len(step.decode))
                    # (the step's whole time: the prompts read during it held its streams)
                    self.metrics.time_per_token.observe(seconds + newcomers.seconds)
                    if step.chunks:
                        self.metrics.prompt_tokens_beside_decode.observe(
                            sum(c.length for c in step.chunks))
        except Exception:  # a failed step costs the running batch, never the server
            log.exception("engine step failed")
            self._fail(EngineError)
        self._send_refused()

    def _send_refused(self) -> None:
        """The errors of the requests that left the queue without a slot, then every event."""
        for request, error in self.scheduler.take_refused():
            self._outbox.put(request, error)
        self._outbox.flush()

    def _deliver(self, step: ScheduledStep, out: StepOutput) -> None:
        """The scheduler takes the step's outcome (chunks read, sequences started), then each
        sampled sequence its token, and the events go to the outbox."""
        self.scheduler.update(step, out.prompt_logprobs, [seq for seq, _ in out.failed])
        for seq, _ in out.failed:
            self._outbox.put(seq.request, EngineError())
        self.metrics.tokens_generated.inc(sum(seq.request.max_new > 0 for seq in out.rows))
        now = time.monotonic()
        for seq, sampled in zip(out.rows, out.sampled):
            if seq.last_token_at is not None:
                self.metrics.inter_token_latency.observe(now - seq.last_token_at)
            seq.last_token_at = now
            self._outbox.put(seq.request, seq.append(sampled))
        for request in {id(s.request): s.request for s in step.started}.values():
            if request.max_new:  # (one that only reads its prompt has no first token)
                self.metrics.time_to_first_token.observe(now - request.arrival)

    def _read_newcomers(self, budget: int) -> None:
        step = self.scheduler.schedule_newcomers(budget)
        if step:
            self._deliver(step, self.runner.execute(step))
        self._send_refused()

    def _fail(self, error: Callable[[], Exception], waiting: bool = False) -> None:
        """Fail every request running or being prefilled, and waiting if asked, each with an
        error of its own (one raised by every call would gather all their frames); and send
        the refused ones theirs (a neighbour's failure is failed here, not in its step)."""
        for request in self.scheduler.abort(waiting):
            self._outbox.put(request, error())
        self._send_refused()


class _Newcomers:
    """Prompts that arrive during a step's pass, for its engine or a neighbour, read whole in
    a pass of their own between two of its layers (once per step), their first tokens sent
    at once."""

    def __init__(self, engine: Engine, streams: bool, arrivals: Callable[[], None] | None,
                 neighbours: list[Engine] = ()):
        self.engine, self.arrivals = engine, arrivals
        self.streams = streams  # whether the pass they wait in carries a stream's row
        self.neighbours, self.seconds = neighbours, 0.0

    def read(self) -> None:  # nothing may be retired here
        if self.arrivals is not None:
            self.arrivals()
        if self.seconds:  # read once a step already
            return
        waiting = [e for e in (self.engine, *self.neighbours)
                   if e.scheduler.waiting and not e._stopping]
        if not waiting:
            return
        t = time.perf_counter()
        for engine in waiting:
            # The streams that wait for the read: this pass's, and the engine's own (a
            # neighbour's running sequences wait for this step to end, then for its read).
            budget = engine.scheduler.budget.tokens(
                self.streams or streams(engine.scheduler.running))
            if engine is self.engine:
                engine._read_newcomers(budget)
                continue
            try:  # a neighbour's failure is its own, not this step's
                engine._read_newcomers(budget)
            except Exception:
                log.exception("engine step failed")
                engine._fail(EngineError)
        self.seconds = time.perf_counter() - t
