"""Dependencies the routes declare: the serving state, readiness, the API key, the chat body."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sqlalchemy.orm import Session

from mistral_serve.api.errors import APIError, from_validation_error
from mistral_serve.api.in_flight import InFlight
from mistral_serve.api.limits import RateLimiter
from mistral_serve.api.metrics import ServingMetrics
from mistral_serve.api.usage import RequestMeter
from mistral_serve.api.protocol import ChatCompletionRequest
from mistral_serve.catalog import Catalog
from mistral_serve.db.key_store import ActiveKey, KeyRefused, KeyStore, KeyStoreUnavailable
from mistral_serve.db.usage_writer import UsageWriter
from mistral_serve.settings import Settings

RETRY_AFTER_SECONDS = "5"


@dataclass
class ServingState:
    settings: Settings
    catalog: Catalog
    keys: KeyStore
    metrics: ServingMetrics
    limiter: RateLimiter
    usage: UsageWriter
    in_flight: InFlight
    is_ready: bool = False  # the engines are running, and the server is not shutting down

    def meter(self, key: ActiveKey, model: str) -> RequestMeter:
        """The usage meter of a request that `key` makes now."""
        now = datetime.fromtimestamp(self.limiter.clock(), timezone.utc)  # the limiter's time: budgets agree
        return RequestMeter(self.usage, self.limiter, key, model, created_at=now)

    def enter(self, meter: RequestMeter) -> None:
        """Count the request in flight until its meter ends. 503 while usage cannot be recorded; 429
        past the key's concurrent-request cap."""
        backlog_mb = self.usage.backlog_bytes_seen / (1 << 20)
        if backlog_mb > self.settings.max_usage_backlog_mb:
            raise APIError(503, f"Usage cannot be recorded now ({backlog_mb:.0f} MB of it waits for the database); "
                                "try again shortly.", type="server_error", code="usage_backlog_full",
                           headers={"Retry-After": RETRY_AFTER_SECONDS})
        key_id = meter.key.id
        if not self.in_flight.try_enter(key_id):
            raise APIError(429, f"This key has {self.in_flight.of_key(key_id)} requests in flight, the most this "
                                "server runs at once for one key; wait for one to finish.", type="requests",
                           code="too_many_concurrent_requests", headers={"Retry-After": "1"})
        meter.on_ended = lambda: self.in_flight.leave(key_id)


def get_serving_state(request: Request) -> ServingState:
    return request.app.state.serving


State = Annotated[ServingState, Depends(get_serving_state)]


def require_ready(state: State) -> None:
    if not state.is_ready:
        raise APIError(503, "The server is starting or stopping; try again shortly.",
                       headers={"Retry-After": RETRY_AFTER_SECONDS})


Ready = Annotated[None, Depends(require_ready)]


def db_session(state: State) -> Iterator[Session]:
    """A database session for one request, closed after it (crud commits; nothing here does)."""
    with state.keys.sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(db_session)]


_bearer = HTTPBearer(auto_error=False, description="An API key: `mistral-serve keys create --email E --name N`")


def current_key(state: State,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ActiveKey:
    """The key in `Authorization: Bearer <key>`, enabled and of an enabled account; 401 otherwise.
    A plain `def`: FastAPI runs it in its threadpool, so the database read never blocks the event loop."""
    raw_key = credentials.credentials.strip() if credentials else ""
    if not raw_key:
        raise _unauthorized("You didn't provide an API key. You need to provide your API key in an Authorization "
                            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    try:
        return state.keys.authenticate(raw_key)
    except KeyRefused as refusal:
        raise _unauthorized(str(refusal)) from None
    except KeyStoreUnavailable as error:
        raise APIError(503, str(error), headers={"Retry-After": RETRY_AFTER_SECONDS}) from None


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, type="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


CurrentKey = Annotated[ActiveKey, Depends(current_key)]


async def read_chat_request(request: Request) -> ChatCompletionRequest:
    """The body as a ChatCompletionRequest: JSON only (415), strictly validated (400); bounded (413) by
    the body-size middleware before it gets here."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}.")
    try:
        return ChatCompletionRequest.model_validate_json(await request.body())
    except ValidationError as error:
        raise from_validation_error(error) from None


ChatRequest = Annotated[ChatCompletionRequest, Depends(read_chat_request)]
