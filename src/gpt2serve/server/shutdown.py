"""Graceful shutdown, the way Kubernetes stops a pod: SIGTERM, then SIGKILL after
`terminationGracePeriodSeconds`.

On the first SIGTERM (or SIGINT) readiness turns false at once, so the endpoint is taken out
of rotation; new requests get 503 with Retry-After (gRPC: UNAVAILABLE); requests already
accepted, running or queued, go on. When the engine is idle, or `grace` seconds have passed,
the engine is stopped: what had not finished fails cleanly (503, or an error event and the
end of its stream; gRPC UNAVAILABLE), nothing is cut off. Then uvicorn is told to exit as
usual; it waits at most WRITE_OUT_SECONDS (ModelServer's grace_period, 30 s by default) for
those last responses to be written, so the process ends, with status 0, within about
`grace` + 1 s of the signal. A second signal exits at once.

uvicorn owns the signal handlers while it serves (KServe's ModelServer runs it), so the hook
is its `Server.handle_exit`; this process runs exactly one such server. Before uvicorn puts its
handlers in place, ModelServer's own are there, and with one worker they stop nothing that
serves HTTP: a SIGTERM in that window used to leave the process running until SIGKILL. Nothing
can have been accepted yet then, so `exit_before_serving` makes such a signal end the process,
and `exit_on_signal` does the same from the start of `gpt2serve serve`, before the models
load: a signal before ModelServer put its handlers in (while a model loaded, or after KServe's
"Setting max asyncio worker threads") met Python's default action and killed the process
(status -15).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:  # (the CLI imports this module before anything heavy: exit_on_signal)
    from .repository import Repository

log = logging.getLogger("gpt2serve.server")

WRITE_OUT_SECONDS = 2  # for the last responses once the engine has stopped
STEP_WAIT_SECONDS = 2  # for the step in flight to end when the engine is stopped


def install(repository: Repository, grace: float) -> None:
    exit_now = uvicorn.Server.handle_exit

    def handle_exit(server, sig, frame):
        if repository.shutting_down:
            return exit_now(server, sig, frame)
        repository.drain()
        waiting, running = repository.pending()
        log.info("signal %d: draining %d running sequences and %d queued requests (up to %gs)",
                 sig, running, waiting, grace)

        def finish():
            t0 = time.monotonic()
            idle = repository.wait_idle(grace)
            if not idle:
                waiting, running = repository.pending()
                log.info("grace period over: failing %d running sequences and %d queued "
                         "requests", running, waiting)
            repository.stop(timeout=STEP_WAIT_SECONDS)
            log.info("drained in %.2fs", time.monotonic() - t0)
            exit_now(server, sig, frame)

        threading.Thread(target=finish, name="gpt2serve-drain", daemon=True).start()

    uvicorn.Server.handle_exit = handle_exit


def exit_on_signal() -> None:
    """From now until ModelServer.start puts its own handlers in, a signal ends the process at
    once, with status 0: the server is starting, its models loading or loaded, and nothing
    has been accepted. Before, a signal while a model loaded met Python's default action
    (status -15), and SIGINT a KeyboardInterrupt's traceback. The engines are not stopped
    first: the handler runs on the thread that is loading, which may hold what stopping one
    waits for, and they have nothing to finish."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda sig, frame: _exit_now(None, sig))


def exit_before_serving(model_server, repository: Repository) -> None:
    """A signal that reaches KServe's handler (installed by ModelServer.start, replaced by
    uvicorn's while it serves, back after) ends the process at once: before serving nothing
    has been accepted, and after it the drain above has already run."""
    model_server.stop = lambda sig: _exit_now(repository, sig)  # (its handlers call it)


def _exit_now(repository: Repository | None, sig: int) -> None:
    try:  # (a log write the signal interrupted raises "reentrant call": exit all the same)
        # After a drain, uvicorn hands the signal it caught on to the handler it replaced
        drained = repository is not None and repository.shutting_down
        log.info("signal %d %s: exiting", sig, "after the drain" if drained else
                 "before the server serves HTTP")
        if repository is not None:
            repository.stop(timeout=STEP_WAIT_SECONDS)
        logging.shutdown()
    finally:
        os._exit(0)
