"""Request bodies are JSON whatever ``Content-Type`` says, as in TensorFlow Serving.

``curl -d '{"instances": ...}'`` sends ``application/x-www-form-urlencoded``; FastAPI would hand
such a body to validation as bytes and the client would be told to fix a header it never set.
This API has no form or binary endpoints, so every body is read as JSON, and a body that is not
JSON is answered with the JSON parse error and where it occurred.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

JSON = b"application/json"


class JsonBodies:
    """ASGI middleware: sets ``Content-Type: application/json`` on every request that has another one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-type")
            if declared and not _is_json(declared):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = dict(scope, headers=[*headers, (b"content-type", JSON)])
        await self.app(scope, receive, send)


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";")[0].strip().lower()
    return media == JSON or media.endswith(b"+json")
