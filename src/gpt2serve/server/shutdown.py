"""Graceful shutdown, the way Kubernetes stops a pod: SIGTERM, then SIGKILL after
`terminationGracePeriodSeconds`.

On the first SIGTERM (or SIGINT) readiness turns false at once, so the endpoint is taken out
of rotation; new requests get 503 with Retry-After; requests already accepted, running or
queued, finish. When the engine is idle, or `grace` seconds have passed, uvicorn is told to
exit as usual and the process ends with status 0. A second signal exits at once.

uvicorn owns the signal handlers while it serves (KServe's ModelServer runs it), so the hook
is its `Server.handle_exit`; this process runs exactly one such server.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from ..engine import Engine

log = logging.getLogger("gpt2serve.server")


def install(predictor, engine: Engine, grace: float) -> None:
    exit_now = uvicorn.Server.handle_exit

    def handle_exit(server, sig, frame):
        if engine.draining:
            return exit_now(server, sig, frame)
        predictor.ready = False
        engine.drain()
        waiting, running = engine.load
        log.info("signal %d: draining %d running and %d queued requests (up to %gs)",
                 sig, running, waiting, grace)

        def finish():
            t0 = time.monotonic()
            idle = engine.wait_idle(grace)
            log.info("drained in %.2fs%s", time.monotonic() - t0,
                     "" if idle else "; grace period over, stopping what is left")
            exit_now(server, sig, frame)

        threading.Thread(target=finish, name="gpt2serve-drain", daemon=True).start()

    uvicorn.Server.handle_exit = handle_exit
