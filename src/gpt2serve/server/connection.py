"""The HTTP connection under KServe's app: uvicorn's httptools protocol, with each request's
head (its request line and headers) bounded in size and in time, and what follows the head
(body, chunk framing, trailers) bounded in size.

uvicorn bounds none of them. httptools keeps a header line whole until its end comes, so a
client that sent `X: ` and then megabytes without a line break held them all (three such
connections took 530 MB, until they closed), and a trailer line after a chunked body the
same way; a client that sent part of a head held its connection for ever, and uvicorn's
keep-alive timeout, which any byte re-arms, never closed one that trickled a header line
every few seconds. All of that comes before the app, so before the API key
(middleware.BodyLimit bounds the body as the app reads it). Here:

- a head over HEAD_BYTES gets 431, and one not received whole within `--header_timeout`
  seconds of its first byte 408; a request whose bytes after its head (the body with its
  chunk framing and trailers) pass `--max_body_bytes` + HEAD_BYTES gets 413. Each closes the
  connection, and nothing it sends after is read. A head is counted read by read: one that
  came whole in one read is measured when it is parsed (its request answered 431 in turn);
- the responses to the requests before it on the connection (HTTP pipelining) are written
  first: the refusal follows them, and a head's time starts once they are written;
- a new connection that sends nothing is closed after uvicorn's keep-alive timeout, as an
  idle one between requests is (before, never);
- a response whose client reads none of it for `--send_timeout` seconds is dropped
  (`pause_writing`);
- a lost connection is told to each of its requests not answered whole, the one running
  and those pipelined behind it (uvicorn told only the latest read);
- requests pipelined behind the one running are read up to PIPELINED of them, their bodies
  up to `--max_body_bytes`; past that the connection is not read until they are fewer (so a
  client that leaves meanwhile is seen only then: the request running goes on to its end).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque

import kserve.model_server
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .auth import PEER
from .middleware import error_body

# Envoy (Istio's and Knative's ingress) refuses request heads past 60 KiB by default, nginx
# past four buffers of 8 KiB: a bearer token or a cookie of several KiB is far below this.
HEAD_BYTES = 64 * 1024
TOO_LARGE = f"request head exceeds {HEAD_BYTES} bytes"
# Requests read ahead on a connection while one runs (HTTP/1.1 pipelining), at most
PIPELINED = 8
STATUS = {408: b"Request Timeout", 413: b"Content Too Large",
          431: b"Request Header Fields Too Large"}


class _HeldFlow(FlowControl):
    """uvicorn's flow control, whose reads a request's `receive()` resumes, unless `held`."""

    held = False

    def resume_reading(self) -> None:
        if not self.held:
            super().resume_reading()


class BoundedHttp(HttpToolsProtocol):
    seconds = 10.0  # --header_timeout; install sets all three
    max_body_bytes = 1 << 20  # --max_body_bytes
    send_seconds = 60.0  # --send_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.flow = _HeldFlow(transport)
        self.message = 0  # the request being read, counted from 1
        self.phase: str | None = None  # of it: "head", "body", None once read whole
        self.head_bytes = self.body_bytes = self.head_size = 0
        self.deadline: asyncio.TimerHandle | None = None  # for the head being read
        self.refusal: tuple[int, str] | None = None  # to answer once earlier ones are
        self.refused = None  # the refused request's cycle, where it has one (its body's)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)
        self.stalled: asyncio.TimerHandle | None = None  # writing, to a client not reading
        self.cycles: list = []  # the requests read and not answered whole, oldest first

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unstall()
        # uvicorn tells only the latest request read (`self.cycle`) that its client left: a
        # request with another pipelined behind it generated to its end for nobody.
        for cycle in self.cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The socket is full (the client reads none of it): the response waits, its
        engine requests' events held meanwhile (a stream of 64 prompts x 16 sequences held
        265 MB for as long as its client kept the connection); past --send_timeout, the
        connection is dropped, which cancels them."""
        super().pause_writing()
        if self.stalled is None:
            self.stalled = self.loop.call_later(self.send_seconds, self.transport.abort)

    def resume_writing(self) -> None:
        self._unstall()
        super().resume_writing()

    def _unstall(self) -> None:
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # refused: nothing more of this connection is read
        message, phase = self.message, self.phase
        super().data_received(data)
        if self._queue_full():
            # (uvicorn pauses reading when a request queues, but the running request's
            # `receive()` resumes it: 60 KB requests pipelined behind one that generated
            # took 500 MB in 20 s, until it ended)
            self.flow.held = True
            self.flow.pause_reading()
        if self.refusal is not None or phase is None or message != self.message:
            return  # a read that starts a request (or ends one and starts the next) is not
            # counted: at most one read of a request goes unmeasured
        if self.phase == "head":
            self.head_bytes += len(data)
            if self.head_bytes > HEAD_BYTES:
                self._refuse(431, TOO_LARGE)
        elif self.phase == "body":
            self.body_bytes += len(data)
            if self.body_bytes > self.max_body_bytes + HEAD_BYTES:
                self._refuse(413, f"request body exceeds {self.max_body_bytes} bytes "
                                  "(--max_body_bytes)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[PEER] = self.client  # (before a proxy header rewrites `client`)
        self.message += 1
        self.phase, self.head_bytes, self.body_bytes, self.head_size = "head", 0, 0, 0
        if self._answered():
            self._arm()

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase == "head":  # (trailers, after the body, are counted as read)
            self.head_size += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.phase = "body"
        app = self.app
        if self.head_size > HEAD_BYTES:
            self.app = _head_too_large  # its request is answered 431 in turn
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        if self.cycle is not None:
            self.cycles = [c for c in self.cycles
                           if not c.response_complete and c is not self.cycle] + [self.cycle]

    def on_message_complete(self) -> None:
        self.phase = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, if any
        if self.flow.held and not self._queue_full() and self.refusal is None:
            self.flow.held = False
            self.flow.resume_reading()
        if not self._answered():
            return
        if self.refusal is None:
            if self.phase == "head" and self.deadline is None:
                self._arm()  # a head that came in while the responses before it were written
        elif self.refused is not None and self.refused.response_complete:
            self.transport.close()  # its app answered it (before reading all of it)
        else:
            self._answer(*self.refusal)

    def _queue_full(self) -> bool:
        """Whether the requests pipelined behind the one running, which wait their turn, are
        as many as PIPELINED or their bodies past --max_body_bytes."""
        return len(self.pipeline) >= PIPELINED or sum(
            len(cycle.body) for cycle, _ in self.pipeline) > self.max_body_bytes

    def _answered(self) -> bool:
        """Whether no response is being written or waits its turn: every request read so
        far has its whole response, but a refused one whose app has not begun one."""
        cycle = self.cycle
        return not self.pipeline and (cycle is None or cycle.response_complete or (
            cycle is self.refused and not cycle.response_started))

    def _arm(self) -> None:
        self.deadline = self.loop.call_later(self.seconds, self._refuse, 408,
                                             f"request head not received whole within "
                                             f"{self.seconds:g} s (--header_timeout)")

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` and close once the requests before this one are answered;
        read nothing more meanwhile."""
        self._disarm()
        if self.transport.is_closing():  # (uvicorn's own 400 for a request it cannot parse)
            return
        self.refusal = (status, message)
        self.flow.pause_reading()
        if self.phase == "body":  # its request has a cycle: never run, if it waits its turn
            self.refused = self.cycle
            self.pipeline = deque(item for item in self.pipeline if item[0] is not self.cycle)
        if self._answered():
            self._answer(status, message)

    def _answer(self, status: int, message: str) -> None:
        if self.transport.is_closing():
            return
        if self.refused is not None and not self.refused.response_complete:
            self.refused.disconnected = True  # its app, waiting for the rest, writes nothing
            self.refused.message_event.set()
        # the route, as far as its request line came: OpenAI's error shape on OpenAI's routes
        body = _error(self.url.split(b"?")[0].decode("latin-1"), status, message)
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, STATUS[status], len(body), body))
        self.transport.close()


def _error(path: str, status: int, message: str) -> bytes:
    return json.dumps(error_body(path, status, message)).encode()


async def _head_too_large(scope, receive, send) -> None:
    body = _error(scope["path"], 431, TOO_LARGE)
    await send({"type": "http.response.start", "status": 431, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def install(seconds: float, max_body_bytes: int, send_seconds: float) -> None:
    """Serve HTTP through BoundedHttp: KServe's ModelServer makes its uvicorn Config in
    RESTServer (as it starts), with no way to name a protocol; this process runs one."""
    BoundedHttp.seconds, BoundedHttp.max_body_bytes = seconds, max_body_bytes
    BoundedHttp.send_seconds = send_seconds

    class RESTServer(kserve.model_server.RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.http = BoundedHttp

    kserve.model_server.RESTServer = RESTServer
