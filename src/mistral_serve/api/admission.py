"""RequestTicket: one chat request's life on the serving side, from admission to its usage row.

    async with state.admit(key, model) as ticket:      # 503, 429, 403: before any work on the request
        ...                                             # 404 / 400: refused for its content
        max_tokens = await ticket.reserve(...)          # 429: over a token limit or budget
        ...                                             # the engine runs it; chat.py reports how it ended

Entering checks that usage can be recorded (503), counts the request in flight for its key and its
account (429 past either cap), counts it against requests per minute (429; see api/limits.py) and
checks that the account's plan allows the model (403). All of it before the request is tokenized
or its grammar compiled: a request refused for its content has been counted. Leaving settles the
limiter's reservation against what was really generated, writes the request's one usage row, and
counts it out — however the request ended: refused, finished, failed, or the client gone. A
streamed reply outlives its route: the route hands the ticket to the stream (`keep_open`), and the
stream closes it when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
import logging
import time
import uuid

from mistral_serve.api.errors import APIError
from mistral_serve.api.in_flight import InFlight
from mistral_serve.api.limits import Admission, RateLimiter
from mistral_serve.db.crud import UsageRecord
from mistral_serve.db.key_store import ActiveKey
from mistral_serve.db.usage_writer import UsageWriter

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the reply
MAX_MODEL_CHARS = 200  # the width of usage.model
RETRY_AFTER_SECONDS = "5"


@dataclass(frozen=True)
class GenerationEnd:
    """How the engine's part of a request ended, as its usage row reports it."""

    status: str  # "ok", "error" or "aborted"
    http_status: int
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: str | None


class RequestTicket:
    """A chat request of `key` for `model` (as the client named it), admitted until it is closed."""

    def __init__(self, key: ActiveKey, model: str, *, usage: UsageWriter, limiter: RateLimiter,
                 in_flight: InFlight, max_usage_backlog_mb: int):
        self.key = key
        self.model = model[:MAX_MODEL_CHARS]
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created_at = datetime.fromtimestamp(limiter.clock(), timezone.utc)  # the limiter's time: budgets agree
        self._usage = usage
        self._limiter = limiter
        self._in_flight = in_flight
        self._max_usage_backlog_mb = max_usage_backlog_mb
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._admission: Admission | None = None
        self._end: GenerationEnd | None = None
        self._is_in_flight = False
        self._is_kept_open = False
        self._is_closed = False

    async def __aenter__(self) -> RequestTicket:
        try:
            self._check_usage_backlog()
            self._enter_in_flight()
            self._admission = await self._limiter.admit(self.key)
            self._check_plan_model()
        except BaseException as error:  # refused at the door (or the client left): the row says so
            if isinstance(error, APIError):
                error.headers = {"x-request-id": self.request_id, **(error.headers or {})}
            self.close(error)
            raise
        return self

    async def __aexit__(self, exc_type, error: BaseException | None, traceback) -> None:
        if isinstance(error, APIError):  # a refusal names the request too, and says where the limits stand
            error.headers = {**self.headers, **(error.headers or {})}
        if error is None and self._is_kept_open:
            return  # a stream holds it now, and closes it when it ends
        self.close(error)

    @property
    def account_id(self) -> int:
        return self.key.account_id

    @property
    def tenant(self) -> str:
        """Who asked, for the engine's fair scheduling: the account first, then its key."""
        return f"{self.key.account_id}/{self.key.id}"

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the reply: x-request-id (the completion id, which the usage row and the log
        line carry too) and the x-ratelimit-* trios of the limits that apply."""
        limits = self._admission.headers if self._admission is not None else {}
        return {"x-request-id": self.request_id, **limits}

    async def reserve(self, num_prompt_tokens: int, n: int, max_tokens: int | None, default_max_tokens: int) -> int:
        """Charge the request its prompt and n × its most tokens per choice against the token limits
        and budgets (a 429 APIError when they cannot take it); settled when the ticket closes. Returns
        the most tokens per choice: `max_tokens` if given, else `default_max_tokens` lowered to fit."""
        return await self._limiter.reserve(self._admission, num_prompt_tokens, n, max_tokens, default_max_tokens)

    def on_first_token(self) -> None:
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()

    def on_generation_end(self, end: GenerationEnd) -> None:
        """The engine's part is over: the usage row reports it (not how the reply was sent after)."""
        self._end = end

    def keep_open(self) -> RequestTicket:
        """Leave the ticket open when its `async with` ends without an error: for a streamed reply,
        whose body runs after the route has returned. The stream must `close()` it."""
        self._is_kept_open = True
        return self

    def close(self, error: BaseException | None = None) -> None:
        """Settle the reservation, write the usage row and count the request out; once. `error`: what
        ended the request, if the engine never reported how it ended. Never blocks."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            end = self._end or _end_without_engine(error)
            if self._admission is not None:
                self._limiter.settle(self._admission, end.num_prompt_tokens + end.num_completion_tokens)
            self._write_row(end)
        finally:
            if self._is_in_flight:
                self._in_flight.leave(self.key.id, self.key.account_id)

    def _check_usage_backlog(self) -> None:
        backlog_mb = self._usage.backlog_bytes_seen / (1 << 20)
        if backlog_mb > self._max_usage_backlog_mb:
            raise APIError(503, f"Usage cannot be recorded now ({backlog_mb:.0f} MB of it waits for the database); "
                                "try again shortly.", type="server_error", code="usage_backlog_full",
                           headers={"Retry-After": RETRY_AFTER_SECONDS})

    def _enter_in_flight(self) -> None:
        key = self.key
        at_cap = self._in_flight.try_enter(key.id, key.account_id, key.plan.max_concurrent_requests)
        if at_cap == "key":
            raise APIError(429, f"This key has {self._in_flight.of_key(key.id)} requests in flight, the most this "
                                "server runs at once for one key; wait for one to finish.", type="requests",
                           code="too_many_concurrent_requests", headers={"Retry-After": "1"})
        if at_cap == "account":
            raise APIError(429, f"Your account has {self._in_flight.of_account(key.account_id)} requests in flight "
                                "over all its keys, the most it may run at once; wait for one to finish.",
                           type="requests", code="too_many_concurrent_requests", headers={"Retry-After": "1"})
        self._is_in_flight = True

    def _check_plan_model(self) -> None:
        plan = self.key.plan
        if not plan.allows_model(self.model):
            label = self.key.plan_label
            raise APIError(403, f"{label[0].upper()}{label[1:]} does not include the model {self.model!r}; it "
                                f"includes: {', '.join(plan.models)}.",
                           type="invalid_request_error", param="model", code="model_not_in_plan")

    def _write_row(self, end: GenerationEnd) -> None:
        now = time.perf_counter()
        ttft_ms = None if self._first_token_at is None else round((self._first_token_at - self._started) * 1000)
        logger.info("%s %s key %d account %d: %s %d, %d prompt + %d completion tokens, %.0f ms", self.request_id,
                    self.model, self.key.id, self.key.account_id, end.status, end.http_status, end.num_prompt_tokens,
                    end.num_completion_tokens, (now - self._started) * 1000)
        self._usage.record(UsageRecord(
            request_id=self.request_id, key_id=self.key.id, account_id=self.key.account_id, model=self.model,
            status=end.status, http_status=end.http_status, duration_ms=round((now - self._started) * 1000),
            prompt_tokens=end.num_prompt_tokens, cached_prompt_tokens=end.num_cached_prompt_tokens,
            completion_tokens=end.num_completion_tokens, finish_reason=end.finish_reason,
            time_to_first_token_ms=ttft_ms, created_at=self.created_at))


def _end_without_engine(error: BaseException | None) -> GenerationEnd:
    """A request the engine never reported on: refused (429: "limited"), failed, or left by its client."""
    if not isinstance(error, Exception):  # none, or a cancellation: the client left before the engine saw it
        return GenerationEnd("aborted", CLIENT_CLOSED_REQUEST, 0, 0, 0, None)
    http_status = error.status_code if isinstance(error, APIError) else 500
    return GenerationEnd("limited" if http_status == 429 else "error", http_status, 0, 0, 0, None)
