"""Metering: each chat request with a valid key ends as one usage row, however it ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
import logging
import time
import uuid

from mistral_serve.api.limits import Admission, RateLimiter
from mistral_serve.db.crud import UsageRecord
from mistral_serve.db.key_store import ActiveKey
from mistral_serve.db.models import utcnow
from mistral_serve.db.usage_writer import UsageWriter

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the reply
MAX_MODEL_CHARS = 200  # the width of usage.model


@dataclass
class RequestMeter:
    """One request's clock and its single usage row. `admission` is set once the limiter lets it in."""

    writer: UsageWriter
    limiter: RateLimiter
    key: ActiveKey
    model: str  # as the client named it: cut to MAX_MODEL_CHARS
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created_at: datetime = field(default_factory=utcnow)
    started: float = field(default_factory=time.perf_counter)
    admission: Admission | None = None
    first_token_at: float | None = None
    is_ended: bool = False
    on_ended: Callable[[], None] | None = None  # called once, when the request's row is recorded

    def on_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def on_refused(self, http_status: int) -> None:
        """The request ended before reaching the engine: refused by a limit (429) or for its content."""
        self._end("limited" if http_status == 429 else "error", http_status)

    def on_end(self, status: str, http_status: int, num_prompt_tokens: int, num_cached_prompt_tokens: int,
               num_completion_tokens: int, finish_reason: str | None) -> None:
        """The engine's part is over ("ok", "error" or "aborted"). Never blocks."""
        if self.admission is not None:
            self.limiter.settle(self.admission, num_prompt_tokens + num_completion_tokens)
        self._end(status, http_status, num_prompt_tokens, num_cached_prompt_tokens, num_completion_tokens,
                  finish_reason)

    def _end(self, status: str, http_status: int, num_prompt_tokens: int = 0, num_cached_prompt_tokens: int = 0,
             num_completion_tokens: int = 0, finish_reason: str | None = None) -> None:
        if self.is_ended:
            logger.error("request %s was metered twice", self.request_id)
            return
        self.is_ended = True
        now = time.perf_counter()
        ttft_ms = None if self.first_token_at is None else round((self.first_token_at - self.started) * 1000)
        self.writer.record(UsageRecord(
            request_id=self.request_id, key_id=self.key.id, account_id=self.key.account_id, model=self.model[:MAX_MODEL_CHARS],
            status=status, http_status=http_status, duration_ms=round((now - self.started) * 1000),
            prompt_tokens=num_prompt_tokens, cached_prompt_tokens=num_cached_prompt_tokens,
            completion_tokens=num_completion_tokens, finish_reason=finish_reason, time_to_first_token_ms=ttft_ms,
            created_at=self.created_at))
        if self.on_ended is not None:
            self.on_ended()
