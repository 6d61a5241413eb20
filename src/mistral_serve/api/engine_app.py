"""create_engine_app: `mistral-serve engine`, our engine alone, for a gateway to put in a pool.

It serves the OpenAI chat and models routes under /v1 to callers holding the shared token, plus
/health (200 while it takes requests, for the gateway's health checks) and Prometheus /metrics (in
vLLM's names too, where vLLM has one). There are no accounts, keys, limits or usage rows: the
gateway that forwards requests here keeps those. The chat path is the gateway's own (chat.py,
chat_replies.py), so a pooled model answers exactly as a model in the gateway's process would.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from mistral_serve import __version__
from mistral_serve.api import errors, middleware, openapi
from mistral_serve.api.app import model_clients, models_running
from mistral_serve.api.compilations import Compilations
from mistral_serve.api.engine_ticket import EngineRequests
from mistral_serve.api.metrics import ServingMetrics
from mistral_serve.api.model_client import ModelClient
from mistral_serve.api.routes import engine
from mistral_serve.catalog import Catalog
from mistral_serve.engine.client import EngineClient
from mistral_serve.settings import Settings


@dataclass
class EngineState:
    settings: Settings
    catalog: Catalog
    metrics: ServingMetrics
    token: str | None  # callers must send it as a Bearer token; None: anyone who reaches the port
    in_flight: EngineRequests = field(default_factory=EngineRequests)
    is_ready: bool = False  # the engines run, and the process is not shutting down
    compilations: Compilations = field(default_factory=Compilations)  # grammars being compiled, per tenant


def create_engine_app(settings: Settings, clients: Mapping[str, EngineClient | ModelClient],
                      token: str | None) -> FastAPI:
    """An app serving `clients` (model id → engine) to callers that send `token`."""
    catalog = Catalog.from_clients(model_clients(clients), quantization=settings.quantize)
    state = EngineState(settings, catalog, ServingMetrics(catalog, is_vllm_named_too=True), token)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with models_running(state):
            yield

    app = FastAPI(title="mistral-serve engine", version=__version__, lifespan=lifespan,
                  description="One mistral-serve engine: OpenAI-compatible chat completions for a gateway.")
    app.state.serving = state
    errors.install(app)
    # the token guards every route that does work, so any Host may be named unless the operator limits them
    middleware.install(app, settings.allowed_hosts or ("*",))
    openapi.install(app)
    app.include_router(engine.router)
    return app
