"""What every request passes through before its route: a check of the Host it was sent to, a bound
on the body's size, headers that tell a browser not to guess content types, and a last catch that
turns an unexpected error into the 500 envelope. Plain ASGI, so streams pass through untouched."""

from __future__ import annotations

from collections.abc import Iterable
import json
import logging

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistral_serve.api.errors import APIError

MAX_BODY_BYTES = 4 << 20  # on every route; a 32k-token conversation is far smaller
NOSNIFF = (b"x-content-type-options", b"nosniff")
SERVER_ERROR_MESSAGE = "The server had an error while processing your request."

logger = logging.getLogger(__name__)


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


class TrustedHosts:
    """400 `host_not_allowed` for a request whose Host header names none of `allowed_hosts` ("*": any);
    the port is ignored. A web page that rebinds its own DNS name to 127.0.0.1 can make a browser send
    requests to a server on the loopback, but they carry the page's name as their Host: this is what
    keeps such a page from driving the dashboard and the API of a developer's local server."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed_hosts = {_host_name(host) for host in allowed_hosts}
        self.is_any_allowed = "*" in self.allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_any_allowed:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if _host_name(host) in self.allowed_hosts:
            return await self.app(scope, receive, send)
        error = APIError(400, f"This server does not answer to the host {host!r}. If that is its name, start it "
                              f"with --allowed-hosts (or MISTRAL_SERVE_ALLOWED_HOSTS) naming it.",
                         code="host_not_allowed")
        await _send_json(send, error.status_code, error.body())


def _host_name(host: str) -> str:
    """The name of a Host header or a setting, without port or IPv6 brackets, in lower case:
    "[::1]:8000" → "::1", "LocalHost.:80" → "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port (an IPv6 address has more colons, and needs brackets with a port)
        host = host.partition(":")[0]
    return host.removesuffix(".")


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


class UnexpectedErrors:
    """An error no route handled (a bug, a failed model run) becomes the 500 envelope, and its
    traceback goes to the log. Starlette's own last handler would answer too, but then re-raises, and
    the server drops the connection: a client reusing it would see its next request cut."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_started = False

        async def watched_send(message: Message) -> None:
            nonlocal is_started
            is_started = is_started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if is_started:  # part of the reply is out: only closing the connection can tell the client
                raise
            error = APIError(500, SERVER_ERROR_MESSAGE, type="server_error")
            await _send_json(send, error.status_code, error.body(), keep_alive=True)


async def _send_json(send: Send, status: int, body: dict, *, keep_alive: bool = False) -> None:
    content = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()), NOSNIFF]
    if not keep_alive:  # the body may not have been read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def install(app: FastAPI, allowed_hosts: Iterable[str]) -> None:
    app.add_middleware(UnexpectedErrors)  # the innermost of these: errors from routes and their handlers
    app.add_middleware(BodySizeLimit)
    app.add_middleware(TrustedHosts, allowed_hosts=tuple(allowed_hosts))  # before anything reads the body
    app.add_middleware(NoSniff)  # the outermost: the 413 and 400 above get it too
