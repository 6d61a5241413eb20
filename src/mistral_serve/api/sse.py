"""HTTP helpers that tie a generation's life to the client's connection: when it goes, the work stops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class EventStreamResponse(StreamingResponse):
    """Server-Sent Events that stop, and close their source, as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content, source=None, on_close: Callable[[], None] | None = None, **kwargs):
        """`source`: an async iterator `content` reads from, closed with it even if `content` never
        started (closing it aborts the generation). `on_close`: called last, once the stream is over."""
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)
        self.source = source
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away while we were sending
                pass
            task_group.cancel_scope.cancel()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            task_group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(stream)
                task_group.start_soon(watch_disconnect)
        finally:
            try:
                await self.body_iterator.aclose()  # closing it aborts the generation
                if self.source is not None:
                    await self.source.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (the request body must be read)."""
    task = asyncio.ensure_future(work)

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client is gone (or we are): closing the work aborts the generation
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
