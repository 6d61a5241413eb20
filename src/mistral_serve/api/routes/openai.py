"""The OpenAI-style routes; app.py mounts them twice, under /v1 and under /api/ai."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mistral_serve.api import chat_replies
from mistral_serve.api.deps import ChatRequest, CurrentKey, Ready, State
from mistral_serve.api.errors import APIError
from mistral_serve.api.models import model_object
from mistral_serve.api.protocol import (
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelList, ModelObject,
)
from mistral_serve.catalog import Catalog, ServedModel

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 503)}
_CHAT_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 503)}
# one Server-Sent Event: its data is a chunk or, inside a failing stream, the error envelope; then [DONE]
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        ChatCompletionChunk.model_json_schema(), {"$ref": "#/components/schemas/ErrorResponse"}]}},
    {"const": "[DONE]"}]}}}
_CHAT_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}},
    "responses": {"200": {"content": {
        "application/json": {"schema": ChatCompletionResponse.model_json_schema()},
        "text/event-stream": {"schema": _EVENT},
    }}},
}


@router.post("/chat/completions", response_model=None, responses=_CHAT_ERRORS, openapi_extra=_CHAT_DOC)
async def create_chat_completion(key: CurrentKey, _: Ready, request: Request, body: ChatRequest,
                                 state: State) -> Response:
    """Answer a conversation: one JSON reply, or Server-Sent Events with `stream: true`. Both carry the
    key's x-ratelimit-* headers; a key over its limits gets a 429, before any work on its request."""
    async with state.admit(key, body.model) as ticket:
        served = find_model(state.catalog, body.model)
        caps = state.output_caps(key)
        caps.check_request(body)
        return await chat_replies.answer(request, body, served, ticket, caps, state.metrics, state.compilations)


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    catalog = state.catalog
    return ModelList(data=[model_object(name, catalog.get(name), catalog) for name in catalog.names])


@router.get("/models/{model_id:path}", response_model=ModelObject, responses=_ERRORS)
async def retrieve_model(model_id: str, state: State) -> ModelObject:
    return model_object(model_id, find_model(state.catalog, model_id), state.catalog)


def find_model(catalog: Catalog, name: str) -> ServedModel:
    served = catalog.get(name)
    if served is None:
        raise APIError(404, f"The model {name!r} does not exist or is not served here. "
                            f"Served models: {', '.join(catalog.names)}.", param="model", code="model_not_found")
    return served
