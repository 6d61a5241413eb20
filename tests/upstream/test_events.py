"""Reading an upstream's Server-Sent Events, however the network cuts them, up to [DONE]."""

import json

import httpx
import pytest

from mistral_serve.upstream.errors import UpstreamBrokenError
from mistral_serve.upstream.events import SSEDecoder, iter_events

pytestmark = pytest.mark.anyio

CHUNKS = [{"choices": [{"delta": {"content": "Hello"}}]},
          {"choices": [{"delta": {"content": "line\u2028separator, next\u0085line"}}]},  # unescaped in JSON
          {"choices": [{"delta": {}, "finish_reason": "stop"}]}]


def body(events: list, end: str = "\n") -> str:
    lines = [f"data: {json.dumps(event, ensure_ascii=False)}" for event in events] + ["data: [DONE]"]
    return "".join(f"{line}{end}{end}" for line in lines)


def response_of(*parts: bytes | Exception) -> httpx.Response:
    """A streaming response whose body arrives in `parts`; an exception part breaks it there."""
    async def stream():
        for part in parts:
            if isinstance(part, Exception):
                raise part
            yield part
    return httpx.Response(200, content=stream())


async def read_all(response: httpx.Response) -> list[dict]:
    return [event async for event in iter_events(response)]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
async def test_every_line_ending_and_every_cut_of_the_body_give_the_same_events(end):
    encoded = body(CHUNKS, end).encode()
    for cut in range(1, len(encoded)):
        assert await read_all(response_of(encoded[:cut], encoded[cut:])) == CHUNKS, cut
    assert await read_all(response_of(*(encoded[i:i + 1] for i in range(len(encoded))))) == CHUNKS


async def test_comments_other_fields_and_multi_line_data_are_understood():
    text = (": keep-alive\n\nevent: message\nid: 1\nretry: 100\ndata: {\"a\":\ndata:  1}\n\n"
            "data:{\"b\": 2}\n\n: bye\ndata: [DONE]\n\n")
    assert await read_all(response_of(text.encode())) == [{"a": 1}, {"b": 2}]


async def test_nothing_after_done_is_read_as_an_event():
    assert await read_all(response_of(b'data: {"a": 1}\n\ndata: [DONE]\n\ndata: not json\n\n')) == [{"a": 1}]


async def test_a_last_event_without_its_blank_line_still_counts():
    assert await read_all(response_of(b'data: {"a": 1}\n\ndata: [DONE]')) == [{"a": 1}]
    assert await read_all(response_of(b'data: {"a": 1}\n\ndata: [DONE]\r')) == [{"a": 1}]


@pytest.mark.parametrize("parts, message", [
    ((b'data: {"a": 1}\n\n',), "the stream ended without \\[DONE\\]"),
    ((b'data: {"a": 1}\n\ndata: {"b"',), "not JSON"),
    ((b'data: {"a": 1\n\n',), "an event that is not JSON"),
    ((b'data: [1, 2]\n\n',), "an event that is not a JSON object"),
    ((b'data: {"a": 1}\n\n', httpx.ReadError("connection reset")), "the stream broke: ReadError: connection reset"),
    ((b'data: {"a": 1}\n\n', httpx.ReadTimeout("")), "the stream broke: ReadTimeout$"),
])
async def test_a_body_cut_short_or_garbled_is_a_broken_stream(parts, message):
    events = []
    with pytest.raises(UpstreamBrokenError, match=message):
        async for event in iter_events(response_of(*parts)):
            events.append(event)
    assert events == ([{"a": 1}] if parts[0].startswith(b'data: {"a": 1}\n') else [])


def test_an_endless_line_is_a_broken_stream():
    decoder = SSEDecoder()
    with pytest.raises(UpstreamBrokenError, match="an event of more than"):
        for _ in range(20):
            decoder.feed("data: " + "x" * 1024 * 1024)
