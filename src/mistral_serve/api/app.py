"""create_app: the one place where settings, engines, the database and routes are wired together."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve import __version__
from mistral_serve.api import errors
from mistral_serve.api.deps import ServingState
from mistral_serve.api.metrics import ServingMetrics
from mistral_serve.api.routes import health, openai
from mistral_serve.catalog import Catalog
from mistral_serve.db.key_store import KeyStore
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings

API_STYLES = {"/v1": "OpenAI style", "/api/ai": "Oxen style"}


def create_app(settings: Settings, engines: Mapping[str, AsyncEngine], db: sessionmaker[Session]) -> FastAPI:
    """An app serving `engines` (model id → engine) to the keys in `db`, a migrated database. It starts
    the engines on startup and stops them on shutdown."""
    catalog = Catalog.from_engines(engines, quantization=settings.quantize)
    state = ServingState(settings, catalog, KeyStore(db), ServingMetrics(catalog))

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
