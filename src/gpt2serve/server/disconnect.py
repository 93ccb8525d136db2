"""Cancel a request's handler when its client goes away, so its sequences leave the batch.

Starlette stops a streaming response when the client disconnects, but a plain
request/response handler (KServe's V1/V2 predict, non-streaming completions) runs to the end
for nobody, holding KV-cache slots. This ASGI middleware reads the connection after the body
has arrived and cancels the handler on `http.disconnect`; the engine then drops the request's
sequences at its next step.
"""

from __future__ import annotations

import asyncio


class CancelOnDisconnect:
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
