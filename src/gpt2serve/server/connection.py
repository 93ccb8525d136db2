"""The HTTP connection under KServe's app: uvicorn's httptools protocol, with each request's
head (its request line and headers) bounded in size and in time.

uvicorn bounds neither. httptools keeps a header line whole until its end comes, so a client
that sent `X: ` and then megabytes without a line break held them all (three such connections
took 530 MB, until they closed); a client that sent part of a head, or nothing, held its
connection for ever, and uvicorn's keep-alive timeout, which any byte re-arms, never closed
one that trickled a header line every few seconds. All of that comes before the app, so
before the API key (middleware.BodyLimit bounds the body only once the head is in). Here:

- a head over HEAD_BYTES gets 431, and one not received whole within `--header_timeout`
  seconds of its first byte (or of the connection's start) 408; both close the connection. A
  new connection that sent nothing in that time is closed without an answer, as nginx does:
  a browser's preconnect would not read one;
- where the connection still writes the response to a request before it (HTTP pipelining),
  that response is not cut: the connection closes after it.
"""

from __future__ import annotations

import asyncio
import json

import kserve.model_server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Envoy (Istio's and Knative's ingress) refuses request heads past 60 KiB by default, nginx
# past four buffers of 8 KiB: a bearer token or a cookie of several KiB is far below this.
HEAD_BYTES = 64 * 1024
TOO_LARGE = f"request head exceeds {HEAD_BYTES} bytes"
STATUS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHeadHttp(HttpToolsProtocol):
    seconds = 10.0  # --header_timeout (install sets it)

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.head_bytes: int | None = None  # of the head being read; None between heads
        self.deadline: asyncio.TimerHandle | None = None
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Only a chunk wholly inside a head counts: one that ends a head goes on into a body
        # (bounded apart), and one that starts a head came after a body.
        in_head = self.head_bytes is not None
        super().data_received(data)
        if in_head and self.head_bytes is not None:
            self.head_bytes += len(data)
            if self.head_bytes > HEAD_BYTES:
                self._refuse(431, TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_bytes is None:  # a request after another on this connection
            self._start_head()

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # A head that came in one read passed data_received's count: its size is known now.
        # Its request is answered by _head_too_large instead of the app.
        self._end_head()
        if self.head_size <= HEAD_BYTES:
            return super().on_headers_complete()
        app, self.app = self.app, _head_too_large
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _start_head(self) -> None:
        self.head_bytes = self.head_size = 0  # read as it came; of the line and the fields
        self.deadline = self.loop.call_later(self.seconds, self._too_slow)

    def _end_head(self) -> None:
        self.head_bytes = None
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        if self.head_bytes == 0 and self.cycle is None:
            self.transport.close()  # a connection that never sent anything
        else:
            self._refuse(408, f"request head not received whole within {self.seconds:g} s "
                              "(--header_timeout)")

    def _refuse(self, status: int, message: str) -> None:
        self._end_head()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.flow.pause_reading()  # no more of this head is read
            self.cycle.keep_alive = False  # the response in progress ends the connection
            return
        body = _error(message)
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, STATUS[status], len(body), body))
        self.transport.close()


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def _head_too_large(scope, receive, send) -> None:
    body = _error(TOO_LARGE)
    await send({"type": "http.response.start", "status": 431, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def install(seconds: float) -> None:
    """Serve HTTP through BoundedHeadHttp: KServe's ModelServer makes its uvicorn Config in
    RESTServer (as it starts), with no way to name a protocol; this process runs one."""
    BoundedHeadHttp.seconds = seconds

    class RESTServer(kserve.model_server.RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.http = BoundedHeadHttp

    kserve.model_server.RESTServer = RESTServer
