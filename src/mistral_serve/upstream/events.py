"""The events of an upstream's Server-Sent Events stream, as dicts, up to `data: [DONE]`.

Lines end at CR, LF or CRLF and nowhere else: JSON may carry U+2028 or U+0085 unescaped, where a
general line splitter (str.splitlines) would cut an event in two.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
import json
import re

import httpx

from mistral_serve.upstream.errors import UpstreamBrokenError, describe

DONE = "[DONE]"
MAX_EVENT_CHARS = 16 * 1024 * 1024  # an event past this is no chat chunk: the upstream is broken
DRAIN_TIMEOUT_S = 1.0  # how long the body's end may take to follow [DONE] before the connection is dropped
_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Text in, the data of each complete event out. Fields other than `data` (event, id, retry) and
    comments are dropped."""

    def __init__(self):
        self._pending = ""  # text after the last line end
        self._data: list[str] = []  # the current event's data lines

    def feed(self, text: str) -> list[str]:
        self._pending += text
        events: list[str] = []
        start = 0
        for match in _LINE_END.finditer(self._pending):
            if match.group() == "\r" and match.end() == len(self._pending):
                break  # a CR that ends the text may be the first half of a CRLF
            self._take_line(self._pending[start:match.start()], events)
            start = match.end()
        self._pending = self._pending[start:]
        if len(self._pending) + sum(map(len, self._data)) > MAX_EVENT_CHARS:
            raise UpstreamBrokenError(f"an event of more than {MAX_EVENT_CHARS} characters")
        return events

    def close(self) -> list[str]:
        """What the end of the body completes: a last line, and an event that lacked only its blank line."""
        events = self.feed("\n") if self._pending else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _take_line(self, line: str, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
        elif not line.startswith(":"):  # a comment (keep-alive) otherwise
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value.removeprefix(" "))


async def iter_events(response: httpx.Response) -> AsyncGenerator[dict, None]:
    """Each event of a streaming `response`, parsed, until [DONE]. A body that ends before [DONE], breaks
    off, times out, or holds an event that is not a JSON object raises UpstreamBrokenError."""
    decoder = SSEDecoder()
    chunks = response.aiter_text()
    try:
        async for text in chunks:
            for data in decoder.feed(text):
                if data == DONE:
                    await _drain(chunks)
                    return
                yield _parse(data)
        for data in decoder.close():
            if data == DONE:
                return
            yield _parse(data)
    except httpx.HTTPError as error:
        raise UpstreamBrokenError(f"the stream broke: {describe(error)}") from error
    raise UpstreamBrokenError("the stream ended without [DONE]")


def _parse(data: str) -> dict:
    try:
        event = json.loads(data)
    except ValueError:
        raise UpstreamBrokenError(f"an event that is not JSON: {data[:80]!r}") from None
    if not isinstance(event, dict):
        raise UpstreamBrokenError(f"an event that is not a JSON object: {data[:80]!r}")
    return event


async def _drain(chunks: AsyncIterator[str]) -> None:
    """Reads what follows [DONE], normally just the body's end, so that the connection can serve another
    request. A body that goes on past DRAIN_TIMEOUT_S or MAX_EVENT_CHARS is left: closing the response
    then closes its connection."""
    async def read_to_end() -> None:
        num_chars = 0
        async for text in chunks:
            num_chars += len(text)
            if num_chars > MAX_EVENT_CHARS:
                return

    try:
        await asyncio.wait_for(read_to_end(), DRAIN_TIMEOUT_S)
    except (asyncio.TimeoutError, httpx.HTTPError):
        pass
