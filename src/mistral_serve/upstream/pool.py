"""UpstreamPool: the members that serve one model id, the routing between them, their active health
checks, and the streams they open.

A request goes to a member its policy picks among those in rotation. Until the member's first event
has arrived nothing has reached the client, so a member that fails by then (no connection, a
timeout, a 5xx, a 429, a misconfigured answer, a stream broken or a server_error event before the
first event) is left for another, each member tried once and at most max_attempts in all. Once the
first event is out, nothing is retried: the stream raises UpstreamBrokenError if it breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math

import httpx

from mistral_serve.upstream.config import PoolSpec
from mistral_serve.upstream.errors import (
    NoHealthyUpstreamError, UpstreamBrokenError, UpstreamMisconfiguredError, UpstreamRefusedError, describe,
)
from mistral_serve.upstream.events import iter_events
from mistral_serve.upstream.member import BROKEN, BUSY, CONNECT, MISCONFIGURED, SERVER_ERROR, Member, MemberStatus
from mistral_serve.upstream.routing import pick_member
from mistral_serve.upstream.stream import UpstreamStream, failure_kind, is_server_error_event

__all__ = ["NoHealthyUpstreamError", "UpstreamBrokenError", "UpstreamMisconfiguredError", "UpstreamPool",
           "UpstreamRefusedError", "UpstreamStream"]

logger = logging.getLogger(__name__)

KEEPALIVE_EXPIRY_S = 2.0
MAX_REFUSAL_BYTES = 64 * 1024  # of a refusal's body relayed to the client; past it, the body is dropped


class _AttemptFailed(Exception):
    """A member failed a request before its first event: another member may take it."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class UpstreamPool:
    def __init__(self, spec: PoolSpec, *, http: httpx.AsyncClient | None = None):
        """`http`: a client to share (the caller closes it); by default the pool makes its own. Each
        request sets its own timeouts, so a shared client's do not matter."""
        self.spec = spec
        self._members = [Member(upstream, model_id=spec.model_id, failure_threshold=spec.failure_threshold)
                         for upstream in spec.upstreams]
        self._is_own_http = http is None
        # no bound on connections: the gateway's admission bounds the requests in flight
        # idle connections are dropped well before a server drops them (uvicorn: after 5 s), so a request
        # never goes out on a connection the upstream is closing at that moment
        self._http = http or httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None,
                                                                   keepalive_expiry=KEEPALIVE_EXPIRY_S))
        self._stream_timeout = httpx.Timeout(spec.read_timeout_s, connect=spec.connect_timeout_s)
        self._health_checks: asyncio.Task | None = None

    async def start(self) -> None:
        """Starts the active health checks; the first round runs at once, unawaited. Members start in
        rotation."""
        if self._health_checks is None:
            self._health_checks = asyncio.create_task(self._check_health_forever(),
                                                      name=f"health checks of {self.spec.model_id}")

    async def close(self) -> None:
        if self._health_checks is not None:
            self._health_checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_checks
            self._health_checks = None
        if self._is_own_http:
            await self._http.aclose()

    def members(self) -> list[MemberStatus]:
        return [member.status() for member in self._members]

    @property
    def num_in_flight(self) -> int:
        return sum(member.num_in_flight for member in self._members)

    async def open_stream(self, body: dict, *, affinity_key: str | None, request_id: str,
                          headers: dict[str, str] | None = None) -> UpstreamStream:
        """The stream of a chat completion `body` (streaming already asked for), from the first member
        that answers with a first event. Raises NoHealthyUpstreamError when none does,
        UpstreamRefusedError when a member refuses the request's content, UpstreamMisconfiguredError
        when every member tried answered as if our configuration were wrong. The caller closes the
        stream (`async with`, or aclose()) however its reading ends: that releases the member."""
        tried: list[str] = []
        failures: list[_AttemptFailed] = []
        while len(tried) < self.spec.max_attempts:
            member = self._pick(affinity_key, excluded=tried)
            if member is None:
                break
            tried.append(member.name)
            try:
                return await self._open_on(member, body, request_id, headers or {})
            except _AttemptFailed as failure:
                failures.append(failure)
        reasons = "; ".join(f"{name}: {failure}" for name, failure in zip(tried, failures))
        if failures and all(failure.kind == MISCONFIGURED for failure in failures):
            raise UpstreamMisconfiguredError(f"the upstreams of {self.spec.model_id} refuse our configuration: "
                                             f"{reasons}")
        retry_after_s = max(1, math.ceil(self.spec.health_interval_s))
        if not failures:
            raise NoHealthyUpstreamError(f"no upstream of {self.spec.model_id} is in rotation",
                                         retry_after_s=retry_after_s)
        raise NoHealthyUpstreamError(f"no upstream of {self.spec.model_id} could take the request: {reasons}",
                                     retry_after_s=retry_after_s)

    def _pick(self, affinity_key: str | None, *, excluded: list[str]) -> Member | None:
        eligible = {member.name: member for member in self._members
                    if member.is_healthy and member.name not in excluded}
        if not eligible:
            return None
        in_flight = {name: member.num_in_flight for name, member in eligible.items()}
        return eligible[pick_member(self.spec.policy, in_flight, affinity_key, load_factor=self.spec.load_factor)]

    async def _open_on(self, member: Member, body: dict, request_id: str, headers: dict[str, str]) -> UpstreamStream:
        """`member`'s stream, its first event read; _AttemptFailed (recorded on the member) when
        another member may take the request."""
        member.acquire()
        response = stream = None
        try:
            response = await self._http.send(self._request(member, body, request_id, headers), stream=True)
            if response.status_code != 200:
                raise await _status_error(response)
            events = iter_events(response)
            first = await anext(events, None)
            if first is None:
                raise UpstreamBrokenError("the stream ended before its first event")
            if server_error := is_server_error_event(first):
                raise _AttemptFailed(SERVER_ERROR, server_error)
            stream = UpstreamStream(member, response, events, first)
            return stream
        except (httpx.HTTPError, UpstreamBrokenError) as error:
            raise _recorded(member, _AttemptFailed(failure_kind(error), describe(error))) from error
        except _AttemptFailed as failure:
            raise _recorded(member, failure) from None
        finally:
            if stream is None:
                member.release()
                if response is not None:
                    await response.aclose()

    def _request(self, member: Member, body: dict, request_id: str, extra_headers: dict[str, str]) -> httpx.Request:
        payload = body if member.spec.model is None else {**body, "model": member.spec.model}
        headers = {**extra_headers, "Accept": "text/event-stream", "X-Request-Id": request_id,
                   **_authorization(member)}
        return self._http.build_request("POST", member.spec.chat_url, json=payload, headers=headers,
                                        timeout=self._stream_timeout)

    async def _check_health_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._check_health(member) for member in self._members))
            await asyncio.sleep(self.spec.health_interval_s)

    async def _check_health(self, member: Member) -> None:
        try:
            response = await self._http.get(member.spec.health_url, headers=_authorization(member),
                                            timeout=self.spec.health_timeout_s)
        except httpx.HTTPError as error:
            member.record_check(describe(error), is_connect_error=failure_kind(error) == CONNECT)
        except Exception:  # a fault of ours: it must not end the checks that bring members back
            logger.exception("health check of upstream %s of %s", member.name, self.spec.model_id)
        else:
            member.record_check(None if response.status_code == 200 else f"HTTP {response.status_code}")


async def _status_error(response: httpx.Response) -> Exception:
    """What a status other than 200 means: another member may take the request, or the client's request
    is refused."""
    status = response.status_code
    if status == 429:
        return _AttemptFailed(BUSY, "HTTP 429: busy")
    if status in (401, 403, 404) or 300 <= status < 400:
        return _AttemptFailed(MISCONFIGURED, f"HTTP {status}: check the upstream's url, model and token")
    if 400 <= status < 500:
        return UpstreamRefusedError(status, await _json_body(response))
    if status >= 500:
        return _AttemptFailed(SERVER_ERROR, f"HTTP {status}")
    return _AttemptFailed(BROKEN, f"HTTP {status} where a stream was expected")


async def _json_body(response: httpx.Response) -> dict | None:
    """The JSON object a response holds; None when it holds none, or too much."""
    content = b""
    try:
        async for chunk in response.aiter_bytes():
            content += chunk
            if len(content) > MAX_REFUSAL_BYTES:
                return None
        body = json.loads(content)
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _recorded(member: Member, failure: _AttemptFailed) -> _AttemptFailed:
    if failure.kind == BUSY:
        member.record_busy(str(failure))
    else:
        member.record_failure(failure.kind, str(failure))
    return failure


def _authorization(member: Member) -> dict[str, str]:
    return {"Authorization": f"Bearer {member.spec.token}"} if member.spec.token else {}

