"""UpstreamStream: the events of one chat completion from the member that took it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
import contextlib

import httpx

from mistral_serve.upstream.errors import UpstreamBrokenError
from mistral_serve.upstream.member import BROKEN, CONNECT, SERVER_ERROR, TIMEOUT, Member


class UpstreamStream:
    """An async iterator of event dicts: the first event (already read), then the rest until [DONE].

    A stream that breaks raises UpstreamBrokenError, a failure of the member; one that reaches [DONE]
    is a success. An error event (a dict with an "error" key) is yielded like any other; a
    server_error among them makes the stream a failure of the member all the same. However it ends,
    the member's request is released exactly once; aclose() (or leaving `async with`) ends it early
    and closes the connection, so the upstream sees its client gone and stops generating."""

    def __init__(self, member: Member, response: httpx.Response, events: AsyncGenerator[dict, None], first: dict):
        self.member_name = member.name
        self._member = member
        self._response = response
        self._events = events
        self._first: dict | None = first
        self._server_error: str | None = None  # what a server_error event said (the first is none)
        self._is_over = False

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> dict:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._is_over:
            raise StopAsyncIteration
        try:
            event = await self._events.__anext__()
        except (StopAsyncIteration, UpstreamBrokenError) as error:
            if self._is_over:  # closed meanwhile, by another task: no fault of the member's
                raise StopAsyncIteration from None
            self._record_end(error)
            await self.aclose()
            raise
        self._server_error = self._server_error or is_server_error_event(event)
        return event

    async def aclose(self) -> None:
        """Ends the stream at once and closes its connection; again, it does nothing."""
        if self._is_over:
            return
        self._is_over = True
        self._first = None
        self._member.release()  # first: nothing below may keep it counted
        try:
            await self._response.aclose()  # closes the connection unless the body was read to its end
        finally:
            # a reader in another task still runs the generator: its read fails on the closed response
            with contextlib.suppress(RuntimeError):
                await self._events.aclose()

    def _record_end(self, error: BaseException) -> None:
        if isinstance(error, UpstreamBrokenError):
            self._member.record_failure(failure_kind(error), str(error))
        elif self._server_error:
            self._member.record_failure(SERVER_ERROR, self._server_error)
        else:
            self._member.record_success()

    async def __aenter__(self) -> UpstreamStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


def is_server_error_event(event: dict) -> str | None:
    """What went wrong, when `event` is an error the upstream made (type server_error, or a 5xx code
    as vLLM sends them); None for any other event, errors about the request included."""
    error = event.get("error")
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    is_5xx = isinstance(code, (int, str)) and str(code).isdigit() and 500 <= int(code) <= 599
    if error.get("type") == "server_error" or is_5xx:
        return f"server_error event: {str(error.get('message'))[:120]}"
    return None


def failure_kind(error: BaseException) -> str:
    """The kind of member failure an exception of httpx's, or a broken stream, is."""
    if isinstance(error, UpstreamBrokenError) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return CONNECT
    if isinstance(error, httpx.TimeoutException):
        return TIMEOUT
    return BROKEN
