"""Fake OpenAI-compatible upstreams on real loopback ports: each streams, fails, stalls or drops as a
test scripts it, answers /health with a switchable status, and records what it was sent and whether
its client went away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
import json
import socket
import time

import pytest

from mistral_serve.upstream.config import PoolSpec, UpstreamSpec
from mistral_serve.upstream.member import MemberStatus
from mistral_serve.upstream.pool import UpstreamPool
from tests.app_server import serving as serve_in_thread


@pytest.fixture
def anyio_backend():
    return "asyncio"


def chunk(index: int) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": f"t{index}"}, "finish_reason": None}]}


CHUNKS = [chunk(i) for i in range(3)]


@dataclass
class Reply:
    """What a fake's chat endpoint does: a `status` other than 200 answers `body` as JSON; 200 streams
    `events`, then ends as `ending` says: "done" ([DONE]), "eof" (the body ends without [DONE]), "drop"
    (the connection is cut), "stall" (waits for the client to go)."""

    status: int = 200
    events: list[dict] = field(default_factory=lambda: list(CHUNKS))
    ending: str = "done"
    body: dict | None = None


@dataclass
class Received:
    headers: dict[str, str]
    body: dict
    client_port: int


class ConnectionCut(Exception):
    """Raised inside the app after its response began: the server then drops the connection."""


@dataclass
class FakeUpstream:
    name: str
    reply: Reply = field(default_factory=Reply)
    health_status: int = 200
    received: list[Received] = field(default_factory=list)
    num_disconnects: int = 0  # stalled streams whose client went away
    num_health_checks: int = 0
    health_authorizations: list[str | None] = field(default_factory=list)
    base_url: str = ""  # http://127.0.0.1:PORT, once served
    stop: Callable[[], None] = lambda: None  # takes the server down: its port then refuses connections

    def spec(self, **fields) -> UpstreamSpec:
        return UpstreamSpec(url=self.base_url + "/v1", name=self.name, **fields)

    async def __call__(self, scope, receive, send):
        if scope["path"] == "/health":
            self.num_health_checks += 1
            self.health_authorizations.append(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
            await send_json(send, self.health_status, {})
        elif scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            await self.chat(scope, receive, send)
        else:
            await send_json(send, 404, {"error": {"message": "not found"}})

    async def chat(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        self.received.append(Received(headers, json.loads(body), scope["client"][1]))
        reply = self.reply
        if reply.status != 200:
            await send_json(send, reply.status, reply.body or {"error": {"message": "scripted", "type": "x"}})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in reply.events:
            await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(),
                        "more_body": True})
        if reply.ending == "done":
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        elif reply.ending == "eof":
            await send({"type": "http.response.body", "body": b""})
        elif reply.ending == "drop":
            raise ConnectionCut("scripted")
        elif reply.ending == "stall":
            while (await receive())["type"] != "http.disconnect":
                pass
            self.num_disconnects += 1


async def send_json(send, status: int, body: dict) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def serving(app):
    """`app` under a real uvicorn on a free loopback port, in a thread: yields its base URL."""
    return serve_in_thread(app, lifespan="off", log_config=None, log_level="critical", timeout_graceful_shutdown=2)


@pytest.fixture
def fakes():
    """make(*names) → a served FakeUpstream per name, each taken down after the test if not before."""
    with ExitStack() as stack:
        def make(*names: str) -> list[FakeUpstream]:
            made = []
            for name in names:
                fake = FakeUpstream(name)
                fake_stack = stack.enter_context(ExitStack())
                fake.base_url = fake_stack.enter_context(serving(fake))
                fake.stop = fake_stack.close
                made.append(fake)
            return made

        yield make


def closed_port_url() -> str:
    """A loopback URL where nothing listens: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def pool_spec(*upstreams: FakeUpstream | UpstreamSpec, **options) -> PoolSpec:
    """A pool of `upstreams` that serves "m"; least outstanding by default, so that with no key and no
    load the members are tried in name order."""
    options.setdefault("policy", "least_outstanding")
    specs = tuple(upstream if isinstance(upstream, UpstreamSpec) else upstream.spec() for upstream in upstreams)
    return PoolSpec("m", specs, **options)


@asynccontextmanager
async def pool_of(*upstreams: FakeUpstream | UpstreamSpec, is_started: bool = False, **options):
    """A pool of `upstreams` (see pool_spec), closed at the end; `is_started`: its health checks run."""
    pool = UpstreamPool(pool_spec(*upstreams, **options))
    if is_started:
        await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def read(pool: UpstreamPool, body: dict | None = None, key: str | None = None) -> tuple[str, list[dict]]:
    """The member that served a whole stream, and its events."""
    async with await pool.open_stream(body or chat_body(), affinity_key=key, request_id="req-1") as stream:
        return stream.member_name, [event async for event in stream]


def status_of(pool: UpstreamPool, name: str) -> MemberStatus:
    return next(status for status in pool.members() if status.name == name)


def chat_body(**fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "stream": True, **fields}


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Polls `predicate` until it holds or `timeout_s` passes (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
