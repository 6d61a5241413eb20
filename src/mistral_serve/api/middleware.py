"""What every request passes through before its route: a bound on the body's size, and headers that
tell a browser not to guess content types. Plain ASGI, so streams pass through untouched."""

from __future__ import annotations

import json

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistral_serve.api.deps import MAX_BODY_BYTES
from mistral_serve.api.errors import APIError

NOSNIFF = (b"x-content-type-options", b"nosniff")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the limit. An HTTPException, so that FastAPI's own body
    parsing lets it through (it turns other exceptions into a 400) to the envelope's handler."""

    def __init__(self, max_body_bytes: int):
        super().__init__(413, f"The request body is larger than {max_body_bytes} bytes.")


class BodySizeLimit:
    """413 for a body over `max_body_bytes`: at once when Content-Length says so, else as soon as the
    bytes received pass it (a chunked body has no Content-Length). Nothing past the limit is buffered."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            error = APIError(413, BodyTooLarge(self.max_body_bytes).detail, code="request_too_large")
            return await _send_json(send, error.status_code, error.body())
        num_bytes = 0

        async def bounded_receive() -> Message:
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message
        await self.app(scope, bounded_receive, send)


class NoSniff:
    """X-Content-Type-Options: nosniff on every response: JSON stays JSON, whatever it contains."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == NOSNIFF[0] for name, _ in headers):
                    message = {**message, "headers": [*headers, NOSNIFF]}
            await send(message)
        await self.app(scope, receive, send_with_header)


async def _send_json(send: Send, status: int, body: dict) -> None:
    content = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                            (b"connection", b"close"), NOSNIFF]})
    await send({"type": "http.response.body", "body": content})


def install(app: FastAPI) -> None:
    app.add_middleware(BodySizeLimit)
    app.add_middleware(NoSniff)  # the outermost: the 413 above gets it too
