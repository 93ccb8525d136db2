"""How a failure of a request is told to its client, on every protocol: an HTTP status and a
message that names no internals."""

from __future__ import annotations

import logging

from kserve.errors import InvalidInput

from ..engine import EngineStopped, QueueFull, RequestTimeout
from ..sampling import SamplingError

log = logging.getLogger("gpt2serve.server")

# Refusals a client should retry later or elsewhere: 503 with Retry-After, gRPC UNAVAILABLE.
UNAVAILABLE = (QueueFull, RequestTimeout, EngineStopped)


def failure(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for an exception raised while serving a request."""
    if isinstance(exc, UNAVAILABLE):
        return 503, str(exc)
    if isinstance(exc, (SamplingError, InvalidInput)):
        return 400, str(exc)
    log.error("request failed: %r", exc)
    return 500, "internal server error"
