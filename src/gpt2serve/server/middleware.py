"""ASGI middlewares around KServe's app: bearer-token auth, refusing a cross-site form, a
request body limit, refusing JSON no route can take (non-finite numbers, lone surrogates, deep
nesting, duplicate keys), cancelling a handler whose client went away (and a stream's engine
requests: EventStream), HEAD answered as GET, an HTTP/1.0 client's response sent whole, and
each answer counted; and `started`, which holds a stream's response until its first event."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import AsyncIterator
from urllib.parse import parse_qsl

from starlette.responses import StreamingResponse

from .. import metrics
from ..sampling import quoted
from . import jsonbody

from .auth import (LOOPBACK, MISSING_KEY, PEER, PUBLIC_PATHS, authorized, forwarded,
                   from_local_agent)
from .errors import NO_VERSIONS, openai_shaped


async def _send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


# For a response sent before the request's body was read: uvicorn discards what is left of
# the body as it arrives, and every byte of it holds the connection open again, so a client
# could trickle one for ever. A response with this header closes the connection.
CLOSE = (b"connection", b"close")


def _has_body(headers: dict) -> bool:
    """Whether a request's headers say a body follows (HTTP/1.1: a Content-Length above 0,
    or a Transfer-Encoding)."""
    return (headers.get(b"content-length", b"0") not in (b"0", b"")
            or b"transfer-encoding" in headers)


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    """An error body: OpenAI's shape (HTTP status as `code`, as vLLM) on the OpenAI and
    tokenizer routes, KServe's `{"error": message}` elsewhere."""
    if openai_shaped(path):
        return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                          "code": status}}
    return {"error": message}


class BearerAuth:
    """`Authorization: Bearer <key>` on every route but the public ones (auth.py says which,
    and does the check the gRPC server does too)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            headers = dict(scope["headers"])
            if not (authorized(headers.get(b"authorization"), self.api_key)
                    or from_local_agent(scope["path"], scope.get("client"), headers)):
                return await _send_json(send, 401, error_body(scope["path"], 401, MISSING_KEY),
                                        ((b"www-authenticate", b"Bearer"),
                                         *((CLOSE,) if _has_body(headers) else ())))
        return await self.app(scope, receive, send)


class CrossSiteForms:
    """403 for a POST that a page of another site can send unasked: one from another `Origin`
    with none of what makes a browser ask first (a CORS preflight). A form, or a fetch of text
    with no custom header, reaches any server the browser can; a page on any site could post
    one in a loop to a server on localhost or a private network that has no API key, and have
    it generate for nobody (the routes read JSON whatever the Content-Type, for `curl -d`).
    Anything else from another origin (JSON, KServe's binary tensors, the server's key) went
    through a preflight that a CORS policy, at the ingress, admitted; curl and the SDKs send
    no `Origin`; the playground is of the same origin, which `Sec-Fetch-Site` says where a
    proxy rewrote `Host`. A Bearer header counts only where the server has a key: a gateway
    (oauth2-proxy) may add one of its own to whatever the browser sent."""

    def __init__(self, app, keyed: bool):
        self.app, self.keyed = app, keyed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            if _unasked_cross_site(headers, self.keyed):
                return await _send_json(send, 403, error_body(
                    scope["path"], 403, "a request from another origin must be one that a "
                    "browser sends only after a CORS preflight: JSON (Content-Type: "
                    "application/json), not a form or text"),
                    (CLOSE,) if _has_body(headers) else ())
        return await self.app(scope, receive, send)


# The Content-Types a browser sends cross-origin without a preflight (the Fetch standard's
# CORS-safelisted ones), and none at all (a fetch of a Blob or of no body).
SIMPLE_CONTENT_TYPES = frozenset({b"", b"text/plain", b"application/x-www-form-urlencoded",
                                  b"multipart/form-data"})


def _unasked_cross_site(headers: dict, keyed: bool) -> bool:
    origin = headers.get(b"origin")
    if (origin is None or headers.get(b"sec-fetch-site") == b"same-origin"
            or _same_origin(origin, headers.get(b"host", b""))
            # headers a page sets, not safelisted, so preflighted: binary tensors' length,
            # and the key (not Basic, which a browser adds by itself to a form for a site it
            # has credentials of)
            or b"inference-header-content-length" in headers
            or keyed and headers.get(b"authorization", b"")[:7].lower() == b"bearer "):
        return False
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return media in SIMPLE_CONTENT_TYPES


def _same_origin(origin: bytes, host: bytes) -> bool:
    """Whether `Origin` (scheme://host[:port], or "null") names the `Host` the request was
    sent to, default ports aside."""
    scheme, _, netloc = origin.lower().partition(b"://")
    default = {b"http": b":80", b"https": b":443"}.get(scheme, b"")
    return bool(netloc) and netloc.removesuffix(default) == host.lower().removesuffix(default)


class RebindingGuard:
    """403 for a request from this machine whose `Host` is a DNS name that could be anyone's:
    DNS rebinding. A page on evil.example points its name at 127.0.0.1 (or at the machine's
    own address) once loaded; the browser then counts the server as the page's own origin,
    so no CORS check or preflight stops the page from posting to the key-less routes and
    reading every answer (CrossSiteForms cannot see it: its `Origin` and `Host` agree).

    Local clients name the server as localhost (or `*.localhost`), an IP address or a name
    with no dot (the machine's own; ICANN allows no dotless public names, so none can be
    rebound), or one of `allowed` (`--allowed_hosts`; "*" turns the guard off). "From this
    machine" is the connection's own address (auth.PEER, not what `X-Forwarded-For` says):
    loopback, or the address it reached the server on. In a pod (`in_pod`), only loopback,
    and a request that says a proxy forwarded it (auth.forwarded) is not refused: Knative's
    queue-proxy and KServe's agent pass requests on from 127.0.0.1 with the service's name as
    `Host`, and there only `kubectl port-forward` brings a browser's localhost to the pod.
    Other machines (and `docker run -p`, whose proxy connects from the bridge) are not this
    case: set `--api_key` wherever a browser can reach the port."""

    def __init__(self, app, allowed: frozenset[str], in_pod: bool):
        self.app, self.allowed, self.in_pod = app, allowed, in_pod

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            headers = dict(scope["headers"])
            name = _host_name(headers.get(b"host", b""))
            if (not _local_name(name) and name not in self.allowed
                    and self._from_this_machine(scope, headers)):
                return await _send_json(send, 403, error_body(
                    scope["path"], 403, f"Host {quoted(name)} is not a name of this server: a "
                    f"request from this machine must name localhost, *.localhost, an IP "
                    f"address, a name with no dot, or a host of --allowed_hosts (a guard "
                    f"against DNS rebinding)"), (CLOSE,) if _has_body(headers) else ())
        return await self.app(scope, receive, send)

    def _from_this_machine(self, scope, headers: dict) -> bool:
        peer, server = scope.get(PEER, scope.get("client")), scope.get("server")
        if peer is None:
            return False
        if self.in_pod:
            return peer[0] in LOOPBACK and not forwarded(headers)
        return peer[0] in LOOPBACK or server is not None and peer[0] == server[0]


def _host_name(host: bytes) -> str:
    """The name of a `Host` header, without its port or brackets, lowercase and without a
    final dot: b"LocalHost.:8080" is "localhost", b"[::1]:8080" is "::1"."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def _local_name(name: str) -> bool:
    if "." not in name or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class CountAnswers:
    """Each HTTP request counted by its route and the status its client got
    (metrics.HTTP_ANSWERS): outermost of ours, it sees the answers every one of them gives;
    an exception past them is the 500 Starlette's error middleware then sends. (The
    connection's own refusals, connection.py's 408, 413 and 431 before a request reaches the
    app, are not among them.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = "none"

        async def counted(message):
            nonlocal status
            await send(message)
            if message["type"] == "http.response.start" and status == "none":
                status = str(message["status"])  # (sent: the client got it)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if status == "none":
                status = "500"
            raise
        finally:  # (the route: what Starlette's router matched, in the scope it was given)
            route = getattr(scope.get("route"), "path", None) or "none"
            metrics.HTTP_ANSWERS.labels(route, status).inc()


class HeadAsGet:
    """HEAD answered as GET, without the body (RFC 9110: a server that answers GET answers
    HEAD). Load balancers and uptime checks send it to the probes and `/metrics`, which
    FastAPI's GET routes answered 405; a route that takes no GET still answers 405."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        inner = {**scope, "method": "GET"}
        try:
            return await self.app(inner, receive, headers_only)
        finally:
            if "route" in inner:  # (for CountAnswers)
                scope["route"] = inner["route"]


class WholeForHttp10:
    """An HTTP/1.0 client's response sent whole, with its Content-Length: uvicorn writes a
    response that has none (a stream of events) chunked, which HTTP/1.0 does not have, so a
    streamed completion reached such a client with the chunks' sizes in its text. Such a
    client gets its stream's events at the stream's end."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("http_version") != "1.0":
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def whole(message):
            nonlocal start
            if message["type"] == "http.response.start" and not any(
                    name.lower() == b"content-length" for name, _ in message.get("headers", [])):
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            await send({**start, "headers": [*start.get("headers", []),
                                             (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return await self.app(scope, receive, whole)


class NoModelVersions:
    """400 for KServe V2's model versions (`/versions/...`, `?model_version=`), which this
    single-version server does not have; the SDK would answer them 501."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and versioned(scope["path"], scope["query_string"]):
            return await _send_json(send, 400, {"error": NO_VERSIONS})
        return await self.app(scope, receive, send)


def versioned(path: str, query: bytes) -> bool:
    """Whether a request names a V2 model version: `/v2/models/<name>/versions/<version>...`
    or a `model_version` query parameter. By the path's segments and the query's names: a
    model named `versions` was refused on its readiness, generate and infer routes
    (`/v2/models/versions/ready` holds '/versions/'), and `?my_model_version=1` too."""
    if not path.startswith("/v2/models/"):
        return False
    segments = path.removeprefix("/v2/models/").split("/")
    return (len(segments) > 2 and segments[1] == "versions") or any(
        name == "model_version"
        for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True))


class BodyLimit:
    """413 for a body over `max_bytes`, by its Content-Length or, when chunked, as it arrives;
    408 for one not received whole within `seconds` of the request's start; 415 for one in a
    content coding (gzip, ...), which no route decodes (each called it a body that was not
    UTF-8 or not JSON); all three close the connection (CLOSE).

    The body is read here, at most `max_bytes` of it, and handed on whole: every route reads
    its body completely anyway, and nothing behind this can be made to buffer more. Without
    the deadline, a client that sent its headers and part of its body held its connection
    and what it had sent for as long as it liked (uvicorn has no timeout for a body; a
    fuzzing pass left one waiting). A GET or HEAD with a body is read the same way."""

    def __init__(self, app, max_bytes: int, seconds: float):
        self.app, self.max_bytes, self.seconds = app, max_bytes, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["method"] in ("GET", "HEAD") and not _has_body(headers):
            return await self.app(scope, receive, send)
        coding = headers.get(b"content-encoding", b"").strip().lower()
        if coding not in (b"", b"identity"):
            return await _send_json(send, 415, error_body(
                scope["path"], 415, f"Content-Encoding '{coding.decode('latin-1')[:40]}' is "
                "not supported: send the body uncompressed"),
                ((b"accept-encoding", b"identity"), CLOSE))
        too_big = error_body(scope["path"], 413,
                             f"request body exceeds {self.max_bytes} bytes (--max_body_bytes)")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_json(send, 413, too_big, (CLOSE,))
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.seconds):
                while more and size <= self.max_bytes:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
        except TimeoutError:
            return await _send_json(send, 408, error_body(
                scope["path"], 408, f"request body not received whole within "
                f"{self.seconds:g} s (--body_timeout)"), (CLOSE,))
        if size > self.max_bytes:
            return await _send_json(send, 413, too_big, (CLOSE,))
        return await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive):
    """An ASGI receive that hands over `body` whole, then the connection's own messages."""
    first = {"type": "http.request", "body": body, "more_body": False}

    async def replay():
        nonlocal first
        if first is not None:
            message, first = first, None
            return message
        return await receive()

    return replay


class FiniteJSON:
    """400 for a request body that is JSON no route can take, on every route, before any
    handler: NaN, Infinity or -Infinity (which JSON does not have but Python's parser accepts)
    or a number beyond a double, a lone UTF-16 surrogate escape, nesting deeper than
    jsonbody.MAX_DEPTH, a duplicate key, an integer too long to convert (jsonbody.parse). Let
    through, they reached handlers as 500s: error messages that could not be serialised,
    NaN in sampling, the tokenizer's TypeError, RecursionError. The message names the field.
    A body that is not UTF-8 is refused here too: KServe's V1 route called it "str is not
    valid UTF-8: surrogates not allowed".

    A body that is not JSON at all is left to its route, which says so. Runs inside
    BodyLimit, so the body it parses is bounded. On V2 infer, the one route that reads
    KServe's binary tensor extension, its JSON header alone is checked; elsewhere its
    Inference-Header-Content-Length means nothing (trusted there, a length of 0 let any body
    past this check)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        json_part = _json_part(scope, body)
        try:
            if json_part is not None:
                jsonbody.parse(json_part)
        except jsonbody.BadJSON as e:
            if not e.syntax:
                return await _send_json(send, 400, error_body(scope["path"], 400, str(e), e.param))
        return await self.app(scope, _replay(body, receive), send)


def _json_part(scope, body: bytes) -> bytes | None:
    """What of `body` is JSON: all of it, or on V2 infer the part its first
    Inference-Header-Content-Length gives (the first, as the route reads it). None for a
    header that is not such a length, left to the route, which names it: the whole body,
    binary tensors and all, was read as JSON and refused as 'not valid UTF-8'."""
    if not _v2_infer(scope["path"]):
        return body
    header = next((value for name, value in scope["headers"]
                   if name == b"inference-header-content-length"), None)
    if header is None:
        return body
    length = jsonbody.json_part_length(header)
    return None if length is None or length > len(body) else body[:length]


def _v2_infer(path: str) -> bool:
    """/v2/models/NAME[/versions/V]/infer"""
    return path.startswith("/v2/models/") and path.endswith("/infer")


async def started(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events` once its first has come, before the response (and its 200) starts: a failure
    before then (no slot within --request_timeout, the server stopping) is raised here, and
    the route answers it with its status and Retry-After, as it answers a call without a
    stream, not with a 200 whose stream says 503. The first event waits for the prompt to be
    read and for the first text (a token that ends inside a character, or may begin a stop
    string, is held), or an echo."""
    first = await anext(events)

    async def whole() -> AsyncIterator[str]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return whole()


class EventStream(StreamingResponse):
    """Server-sent events of a call's engine requests, which are cancelled however the
    response ends. The events' generator cancels them when it is closed early, but a client
    that leaves before the response's first step (CancelOnDisconnect cancels it) leaves the
    generator unstarted, so its `finally` never runs and the requests would generate to
    their token limit for nobody. Cancelling a finished request does nothing."""

    media_type = "text/event-stream"  # (what /openapi.json says the stream routes answer)

    def __init__(self, content, engine, requests: list):
        super().__init__(content, media_type=self.media_type)
        self.engine, self.requests = engine, requests

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine.cancel(self.requests)


class CancelOnDisconnect:
    """Cancel a request's handler when its client goes away, so its sequences leave the batch.

    Starlette stops a streaming response when the client disconnects, but a plain
    request/response handler (KServe's V1/V2 predict, non-streaming completions) runs to the
    end for nobody, holding KV-cache slots. This reads the connection after the body has
    arrived and cancels the handler on `http.disconnect`; the engine then drops the request's
    sequences at its next step.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()
        disconnected = asyncio.Event()

        async def app_receive():
            if body_read.is_set():
                # After the body the watcher owns the connection; report its disconnect.
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                body_read.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        handler = asyncio.create_task(self.app(scope, app_receive, send))

        async def watch():
            await body_read.wait()
            if not disconnected.is_set():
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected.set()
            if not handler.done():
                handler.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not disconnected.is_set():
                raise  # cancelled from outside (shutdown), not by us
        finally:
            watcher.cancel()
