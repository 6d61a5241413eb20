"""Dependencies the routes declare: the serving state, readiness, the API key, the chat body."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sqlalchemy.orm import Session

from mistral_serve.api.admission import RETRY_AFTER_SECONDS, RequestTicket
from mistral_serve.api.compilations import Compilations
from mistral_serve.api.errors import APIError, from_validation_error
from mistral_serve.api.in_flight import InFlight
from mistral_serve.api.limits import RateLimiter
from mistral_serve.api.metrics import ServingMetrics
from mistral_serve.api.output_caps import OutputCaps
from mistral_serve.api.protocol import ChatCompletionRequest
from mistral_serve.catalog import Catalog
from mistral_serve.db.key_store import ActiveKey, KeyRefused, KeyStore, KeyStoreUnavailable
from mistral_serve.db.usage_writer import UsageWriter
from mistral_serve.settings import Settings


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
    compilations: Compilations = field(default_factory=Compilations)  # grammars being compiled, per account

    def output_caps(self, key: ActiveKey) -> OutputCaps:
        """How much one request of `key` may generate: its account's plan, and this server's bounds."""
        return OutputCaps(key.plan, key.plan_label, self.settings.max_generated_tokens_per_request,
                          self.settings.max_logprobs_per_request)

    def admit(self, key: ActiveKey, model: str) -> RequestTicket:
        """The ticket of a chat request that `key` makes now for `model`, to enter with `async with`."""
        return RequestTicket(key, model, usage=self.usage, limiter=self.limiter, in_flight=self.in_flight,
                             max_usage_backlog_mb=self.settings.max_usage_backlog_mb)


# dependencies that neither block nor wait are `async def`: FastAPI runs a plain `def` one in its thread
# pool, a round trip of a thread each request pays before its route runs

async def get_serving_state(request: Request) -> ServingState:
    return request.app.state.serving


State = Annotated[ServingState, Depends(get_serving_state)]


async def require_ready(state: State) -> None:
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
