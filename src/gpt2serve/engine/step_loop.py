"""The thread that steps engines: one model's, or every loaded model's in turn.

A server with many models runs them all on one thread, not one thread per model: each round
steps every model that has work once, so a busy model cannot starve a quiet one (each gets a
step per round, whatever its batch), and the cores are never split between models that would
each run their matmuls at half speed (two OpenMP teams on two cores). A prompt that arrives
for any model while another model's pass runs is read between two of that pass's layers
(Engine._step), so a quiet model's first token waits for one layer of the busy one, not for
its whole step. docs/benchmarks.md has the measurement behind the choice
(bench/multimodel.py --compare-loops).
"""

from __future__ import annotations

import logging
import threading

import torch

from .scheduler import EngineStopped

log = logging.getLogger("gpt2serve.engine")


class StepLoop:
    def __init__(self, threads: int | None = None):
        self.threads = threads
        # Guards `engines` and every attached engine's scheduler (it is their `cond`), and
        # wakes the thread when any of them has work.
        self.cond = threading.Condition()
        self.engines: list = []
        self.died = False
        self._thread: threading.Thread | None = None

    def attach(self, engine) -> None:
        """Step `engine` from now on (starting the thread if it is not running)."""
        with self.cond:
            if engine not in self.engines:
                self.engines.append(engine)
            if self._thread is None and not self.died:
                self._thread = threading.Thread(target=self._run_or_die,
                                                name="gpt2serve-engine", daemon=True)
                self._thread.start()
            self.cond.notify_all()

    def detach(self, engine, timeout: float) -> None:
        """Wait, up to `timeout` seconds, for the thread to take a stopping engine out: it
        fails what the engine still had, between two steps."""
        with self.cond:
            self.cond.notify_all()
            self.cond.wait_for(lambda: engine not in self.engines or self._thread is None,
                               timeout)

    def _run_or_die(self) -> None:
        """Should anything but a stop end the thread (a BaseException: each engine's step
        isolates Exceptions), fail what was accepted rather than leave it waiting forever.
        The engines' `alive` turns false, so liveness fails and the pod is restarted."""
        try:
            with torch.inference_mode():
                if self.threads:
                    torch.set_num_threads(self.threads)
                self._run()
        except BaseException as e:
            log.critical("the engine's step thread died: %r", e)
            with self.cond:
                self.died, self._thread = True, None
                for engine in self.engines:  # (a call past its `alive` check is refused too)
                    engine.scheduler.closed = "the engine's step thread has died"
                    engine._fail(lambda: EngineStopped("the engine's step thread has died"),
                                 waiting=True)
                self.engines = []  # (none is stepped: an unload's stop frees its memory)
                self.cond.notify_all()
            raise

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: not self.engines or any(
                    e._stopping or e.scheduler.busy for e in self.engines))
                for engine in [e for e in self.engines if e._stopping]:
                    engine._fail(lambda: EngineStopped("server stopped"), waiting=True)
                    self.engines.remove(engine)
                    self.cond.notify_all()
                if not self.engines:
                    self._thread = None
                    return
                engines = list(self.engines)
            for engine in engines:
                if engine.scheduler.busy and not engine._stopping:
                    engine._step(neighbours=[e for e in engines if e is not engine])
