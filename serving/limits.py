"""Request bodies above ``max_request_bytes`` get a 413 naming the limit, before anything parses them.

A declared ``Content-Length`` over the limit is refused without reading the body; a chunked
body is read up to the limit and refused as soon as it passes it, so no client can make the
server buffer more than the limit. (Starlette's own limiter answers in plain text and cannot
say which limit; clients of this API get JSON errors everywhere.)
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """ASGI middleware enforcing ``limit`` bytes per request body."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(send, 400, f"Content-Length {declared.decode(errors='replace')!r} is not a number")
            elif int(declared) > self.limit:
                await self._refuse(send, 413, self._too_large(int(declared)))
            else:
                await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(send, 413, self._too_large(None))
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self, size: int | None) -> str:
        what = f"of {size} bytes" if size is not None else "(chunked)"
        return (
            f"request body {what} is over the {self.limit}-byte limit (setting max_request_bytes); "
            f"split the rows over several requests"
        )

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        body = orjson.dumps({"error": message})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the already-read body, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
