"""The routes of `mistral-serve engine` (engine_app.py): chat and models for token holders, health and
metrics for the gateway's checks and for monitoring."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from mistral_serve.api import chat_replies
from mistral_serve.api.admission import RETRY_AFTER_SECONDS
from mistral_serve.api.deps import ChatRequest
from mistral_serve.api.engine_ticket import EngineTicket
from mistral_serve.api.errors import APIError
from mistral_serve.api.models import model_object
from mistral_serve.api.output_caps import OutputCaps
from mistral_serve.api.protocol import ErrorResponse, ModelList, ModelObject
from mistral_serve.api.routes.openai import find_model
from mistral_serve.db.plans import PlanLimits

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 503)}
_bearer = HTTPBearer(auto_error=False, description="The engine's shared token (MISTRAL_SERVE_ENGINE_TOKEN)")


def engine_state(request: Request):
    return request.app.state.serving


async def require_token(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """The caller holds the engine's shared token (compared in constant time); 401 otherwise. `async`,
    as it neither blocks nor waits: no thread-pool round trip per request."""
    token = engine_state(request).token
    if token is None:
        return
    given = credentials.credentials.strip() if credentials else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise APIError(401, "This engine takes requests only with its token, as `Authorization: Bearer TOKEN`.",
                       type="invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_ready(request: Request) -> None:
    if not engine_state(request).is_ready:
        raise APIError(503, "The engine is starting or stopping; try again shortly.",
                       headers={"Retry-After": RETRY_AFTER_SECONDS})


Caller = Annotated[None, Depends(require_token)]
Ready = Annotated[None, Depends(require_ready)]


@router.post("/v1/chat/completions", response_model=None, responses=_ERRORS)
async def create_chat_completion(_: Caller, __: Ready, request: Request, body: ChatRequest) -> Response:
    """A chat completion, as the gateway's own chat path answers it; the caller has charged its limits."""
    state = engine_state(request)
    async with EngineTicket(request, state.in_flight) as ticket:
        served = find_model(state.catalog, body.model)
        settings = state.settings
        caps = OutputCaps(PlanLimits(), "this engine", settings.max_generated_tokens_per_request,
                          settings.max_logprobs_per_request)
        return await chat_replies.answer(request, body, served, ticket, caps, state.metrics, state.compilations)


@router.get("/v1/models", response_model=ModelList)
async def list_models(_: Caller, request: Request) -> ModelList:
    catalog = engine_state(request).catalog
    return ModelList(data=[model_object(name, catalog.get(name), catalog) for name in catalog.names])


@router.get("/v1/models/{model_id:path}", response_model=ModelObject, responses=_ERRORS)
async def retrieve_model(_: Caller, model_id: str, request: Request) -> ModelObject:
    catalog = engine_state(request).catalog
    return model_object(model_id, find_model(catalog, model_id), catalog)


@router.get("/health", tags=["health"])
async def health(_: Ready) -> dict:
    """200 while the engine takes requests; 503 while it starts or drains, so a gateway sends none."""
    return {"status": "ok"}


@router.get("/metrics", response_class=Response, tags=["health"])
async def metrics(request: Request) -> Response:
    """Running and waiting requests, KV blocks and prefix-cache hits (in vLLM's names too), latencies."""
    return Response(engine_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
