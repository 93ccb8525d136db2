"""ASGI middlewares around KServe's app: bearer-token auth, a request body limit, refusing
non-finite JSON numbers, and cancelling a handler whose client went away."""

from __future__ import annotations

import asyncio
import json
import math

from .auth import MISSING_KEY, PUBLIC_PATHS, authorized


async def _send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


def _error(path: str, status: int, message: str) -> dict:
    """An error body: OpenAI's shape (HTTP status as `code`, as vLLM) on the OpenAI and
    tokenizer routes, KServe's `{"error": message}` elsewhere."""
    if _openai_shaped(path):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": status}}
    return {"error": message}


class BearerAuth:
    """`Authorization: Bearer <key>` on every route but the public ones (auth.py says which,
    and does the check the gRPC server does too)."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            if not authorized(dict(scope["headers"]).get(b"authorization"), self.api_key):
                return await _send_json(send, 401, _error(scope["path"], 401, MISSING_KEY),
                                        ((b"www-authenticate", b"Bearer"),))
        return await self.app(scope, receive, send)


class NoModelVersions:
    """400 for KServe V2's model versions (`/versions/...`, `?model_version=`), which this
    single-version server does not have; the SDK would answer them 501."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v2/models/") and (
                "/versions/" in scope["path"] or b"model_version=" in scope["query_string"]):
            return await _send_json(send, 400, {"error": "model versions are not supported: "
                                                "each server serves one version"})
        return await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `max_bytes`, by its Content-Length or, when chunked, as it arrives.

    The body is read here, at most `max_bytes` of it, and handed on whole: every route reads
    its body completely anyway, and nothing behind this can be made to buffer more."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        too_big = _error(scope["path"], 413,
                         f"request body exceeds {self.max_bytes} bytes (--max_body_bytes)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_json(send, 413, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_json(send, 413, too_big)
            more = message.get("more_body", False)
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


class _NonFinite(ValueError):
    pass


def _reject(_constant: str):
    raise _NonFinite


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400: beyond a double, Python's parser makes it inf
        raise _NonFinite
    return value


def has_non_finite_number(raw: bytes) -> bool:
    """True if `raw` is JSON but for NaN / Infinity / -Infinity literals or numbers beyond a
    double. Anything else that is not JSON is for the route to judge."""
    try:
        json.loads(raw, parse_constant=_reject, parse_float=_finite)
    except _NonFinite:
        return True
    except (ValueError, RecursionError):
        pass
    return False


class FiniteJSON:
    """400 for a request body with NaN, Infinity or -Infinity (which JSON does not have but
    Python's parser accepts) or a number beyond a double, on every route. Let through, they
    reached error messages that could not be serialised (a 500) or sampling as NaN.

    Runs inside BodyLimit, so the body it parses is bounded; KServe's binary tensor extension
    is checked on its JSON header only."""

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
        header = dict(scope["headers"]).get(b"inference-header-content-length", b"")
        json_part = body[:int(header)] if header.isdigit() else body
        if has_non_finite_number(json_part):
            message = ("request body is not valid JSON: NaN, Infinity and numbers beyond a "
                       "double are not JSON numbers")
            return await _send_json(send, 400, _error(scope["path"], 400, message))
        return await self.app(scope, _replay(body, receive), send)


def _openai_shaped(path: str) -> bool:
    return path.startswith("/openai/") or path in ("/tokenize", "/detokenize")


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
