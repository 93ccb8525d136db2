"""How a failure of a request is told to its client, on every protocol: an HTTP status and a
message that names no internals."""

from __future__ import annotations

import json
import logging

from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

from ..engine import EngineStopped, QueueFull, RequestTimeout
from ..sampling import SamplingError
from .repository import ModelUnavailable, ModelUnloaded

log = logging.getLogger("gpt2serve.server")

# Refusals a client should retry later or elsewhere: 503 with Retry-After, gRPC UNAVAILABLE.
UNAVAILABLE = (QueueFull, RequestTimeout, EngineStopped, ModelUnavailable)
# No such model, or one unloaded through the repository API: 404, gRPC NOT_FOUND.
NOT_FOUND = (ModelNotFound, ModelUnloaded)
# A V2 request that names a model version (REST's path or query, gRPC's field): 400.
NO_VERSIONS = "model versions are not supported: each server serves one version"


# /openapi.json: what a route of ours answers besides its success, in the route's error shape.
# Its "4XX" also keeps FastAPI from listing a 422, which no route of ours answers (each reads
# and checks its own body, and refuses with a 400 naming the field).
_KSERVE_ERROR = {"type": "object", "required": ["error"],
                 "properties": {"error": {"type": "string"}}}
_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                     "param": {"type": ["string", "null"]},
                                     "code": {"type": "integer"}}}}}
# A stream's events: `schema` describes one event, as OpenAPI 3.2's `itemSchema` does (3.1 has
# no word for a stream's items, and schemathesis reads a 3.1 `schema` of text/event-stream so).
SERVER_SENT_EVENTS = {"description": "server-sent events", "content": {"text/event-stream": {
    "schema": {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "description": "a JSON object; an OpenAI stream's last event is [DONE]"}}}}}}


def refusals(openai: bool = False) -> dict:
    """The OpenAPI `responses` of a route's refusals."""
    content = {"application/json": {"schema": _OPENAI_ERROR if openai else _KSERVE_ERROR}}
    return {"4XX": {"description": "refused: 400 names the field at fault; 401 a missing or "
                                   "wrong API key, 404 no such model, 409 a load or unload "
                                   "that another overruled, 413 a body too large, 415 a "
                                   "compressed one", "content": content},
            "503": {"description": "overloaded, draining, or the model cannot load now: "
                                   "retry after Retry-After seconds",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    "content": content}}


def failure(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for an exception raised while serving a request."""
    if isinstance(exc, UNAVAILABLE):
        return 503, str(exc)
    if isinstance(exc, (SamplingError, InvalidInput)):
        return 400, str(exc)
    if isinstance(exc, NOT_FOUND):
        return 404, str(exc)
    log.error("request failed: %r", exc, exc_info=exc)
    return 500, INTERNAL


class QuietRefusals(logging.Filter):
    """Drops the ERROR record, with a traceback, that the KServe SDK's handlers write for
    every InvalidInput (a 400 on :predict, V2 infer, generate), every unknown model (a 404
    on any route that names one, the repository's load and unload too) and every request to
    a model not ready (a 503: one whose load failed, which the log has said once, with why):
    a refusal is the client's mistake or a state, which any client could repeat to flood the
    log and trip error alerts (with the name it made up, control bytes and all). Its handlers
    are registered when the server starts, after ours, so they cannot be replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(
            record.exc_info[1], (InvalidInput, ModelNotReady, *NOT_FOUND)))


class QuietDisconnects(logging.Filter):
    """Drops asyncio's 'socket.send() raised exception.' (no address, no detail), which it
    logs for every write to a connection whose client has gone, past the fifth, until the
    loop runs the connection's end: a stream's events of one step are written in one go,
    and each client that left mid-stream wrote 27 such warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "socket.send() raised exception."


INTERNAL = "internal error"
# 503 is ours (overload, shutdown) or KServe's "not ready": a message written for clients.
_SAID_TO_CLIENTS = frozenset({503})


def openai_shaped(path: str) -> bool:
    return path.startswith("/openai/") or path in ("/tokenize", "/detokenize")


def internal_error_body(path: str, status: int = 500) -> bytes:
    if openai_shaped(path):
        error: object = {"message": INTERNAL, "type": "server_error", "param": None,
                         "code": status}
    else:
        error = INTERNAL
    return json.dumps({"error": error}).encode()


class HideInternalErrors:
    """No internal message reaches a response body, on any route.

    An exception no handler expected becomes a 500 whose body says only "internal error"
    (OpenAI's error shape on the OpenAI routes); the log keeps its traceback. Without this the
    KServe SDK's catch-all handler answers `{"error": "<ExceptionType> : <message>"}` (as on
    V1 predict), and its InferenceError and NotImplementedError handlers echo the message too:
    any 5xx body but 503's (ours and KServe's "not ready", written for clients) is replaced."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        hidden: int | None = None  # the status of a 5xx response being replaced

        async def guarded_send(message):
            nonlocal started, hidden
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 500 and status not in _SAID_TO_CLIENTS:
                    hidden = status
                    return
                started = True  # (sent: one swallowed above is not)
            elif hidden is not None and message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await _send(send, hidden, internal_error_body(scope["path"], hidden))
                return
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise  # the status is sent; the server closes the connection
            await _send(send, 500, internal_error_body(scope["path"]))


async def _send(send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
