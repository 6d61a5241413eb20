"""A pool member: one upstream, its requests in flight, its counters, and the circuit breaker that
takes it out of rotation and brings it back.

A member is "healthy" (in rotation) or "ejected". A connect error ejects it at once: nothing
listens there. Other failures (a 5xx, a timeout, a stream that breaks, a server_error event, a
misconfigured answer) eject it after `failure_threshold` of them in a row; a stream that reaches
[DONE] resets the count. A 429 is no failure: the member is busy, not broken. Only an active health
check that answers 200 brings an ejected member back, and health checks watch healthy members too:
MAX_FAILED_CHECKS failed checks in a row (or one connect error) eject.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
import logging

from mistral_serve.upstream.config import UpstreamSpec

logger = logging.getLogger(__name__)

MAX_FAILED_CHECKS = 2  # failed health checks in a row that eject a healthy member
MAX_ERROR_CHARS = 200  # of last_error
HEALTHY, EJECTED = "healthy", "ejected"
# what can go wrong with a request, as counted in num_errors; all but BUSY are failures
CONNECT, TIMEOUT, SERVER_ERROR, BROKEN, MISCONFIGURED, BUSY = (
    "connect", "timeout", "server_error", "broken", "misconfigured", "busy")


@dataclass(frozen=True)
class MemberStatus:
    """A member as /ready and /metrics show it: never its token."""

    name: str
    url: str
    state: str  # "healthy" or "ejected"
    is_healthy: bool
    num_in_flight: int
    num_requests: int
    num_failures: int  # since start, every kind but busy
    num_errors: dict[str, int]  # by kind: connect, timeout, server_error, broken, misconfigured, busy
    last_error: str | None


class Member:
    def __init__(self, spec: UpstreamSpec, *, model_id: str, failure_threshold: int):
        self.spec = spec
        self.name = spec.name
        self.model_id = model_id  # the pool's, for logs
        self.failure_threshold = failure_threshold
        self.state = HEALTHY
        self.num_in_flight = 0
        self.num_requests = 0
        self.num_errors: Counter[str] = Counter()
        self.num_consecutive_failures = 0
        self.num_failed_checks = 0  # in a row
        self.last_error: str | None = None

    @property
    def is_healthy(self) -> bool:
        return self.state == HEALTHY

    @property
    def num_failures(self) -> int:
        return sum(count for kind, count in self.num_errors.items() if kind != BUSY)

    def acquire(self) -> None:
        """A request goes to this member; release() once when it is over, however it ends."""
        self.num_in_flight += 1
        self.num_requests += 1

    def release(self) -> None:
        if self.num_in_flight <= 0:
            raise RuntimeError(f"upstream {self.name}: released more requests than it took")
        self.num_in_flight -= 1

    def record_success(self) -> None:
        self.num_consecutive_failures = 0

    def record_busy(self, detail: str) -> None:
        self.num_errors[BUSY] += 1
        self.last_error = _short(detail)

    def record_failure(self, kind: str, detail: str) -> None:
        """A request failed on this member for a reason of `kind` (a connect error ejects at once)."""
        self.num_errors[kind] += 1
        self.num_consecutive_failures += 1
        self.last_error = _short(detail)
        logger.warning("upstream %s of %s failed (%s): %s", self.name, self.model_id, kind, self.last_error)
        if kind == CONNECT or self.num_consecutive_failures >= self.failure_threshold:
            self._eject(f"{self.num_consecutive_failures} failure(s) in a row, the last: {self.last_error}")

    def record_check(self, error: str | None, *, is_connect_error: bool = False) -> None:
        """The result of an active health check: `error` None when it answered 200."""
        if error is None:
            self.num_failed_checks = 0
            if not self.is_healthy:
                self.state = HEALTHY
                self.num_consecutive_failures = 0
                logger.warning("upstream %s of %s is back in rotation: its health check answers 200",
                               self.name, self.model_id)
            return
        self.num_failed_checks += 1
        if not self.is_healthy:
            return  # it stays out, as its ejection said
        self.last_error = _short(f"health check: {error}")
        logger.warning("upstream %s of %s failed its health check: %s", self.name, self.model_id, error)
        if is_connect_error or self.num_failed_checks >= MAX_FAILED_CHECKS:
            self._eject(f"{self.num_failed_checks} failed health check(s) in a row, the last: {error}")

    def status(self) -> MemberStatus:
        return MemberStatus(self.name, self.spec.url, self.state, self.is_healthy, self.num_in_flight,
                            self.num_requests, self.num_failures, dict(self.num_errors), self.last_error)

    def _eject(self, reason: str) -> None:
        if self.is_healthy:
            self.state = EJECTED
            logger.warning("upstream %s of %s is out of rotation: %s", self.name, self.model_id, _short(reason))


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 1] + "…"
