"""create_app: the one place where settings, engines and routes are wired together."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from mistral_serve import __version__
from mistral_serve.api import errors
from mistral_serve.api.deps import ServingState
from mistral_serve.api.routes import health, openai
from mistral_serve.catalog import Catalog
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings

API_STYLES = {"/v1": "OpenAI style", "/api/ai": "Oxen style"}


def create_app(settings: Settings, engines: Mapping[str, AsyncEngine]) -> FastAPI:
    """An app serving `engines` (model id → engine). It starts them on startup and stops them on shutdown."""
    state = ServingState(settings, Catalog.from_engines(engines, quantization=settings.quantize))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for model in state.catalog:
            model.engine.start()
        state.is_ready = True
        try:
            yield
        finally:
            state.is_ready = False
            for model in state.catalog:
                await asyncio.to_thread(model.engine.shutdown)

    app = FastAPI(title="mistral-serve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions for Mistral-7B-Instruct.")
    app.state.serving = state
    errors.install(app)
    app.include_router(health.router)
    for prefix, style in API_STYLES.items():
        app.include_router(openai.router, prefix=prefix, tags=[style],
                           generate_unique_id_function=_operation_id(prefix))
    return app


def _operation_id(prefix: str):
    def generate(route: APIRoute) -> str:
        return f"{route.name}{prefix.replace('/', '_')}"
    return generate
