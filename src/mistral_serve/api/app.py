"""create_app: the one place where settings, engines, the database and routes are wired together."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve import __version__
from mistral_serve.api import errors, middleware, openapi
from mistral_serve.api.deps import ServingState
from mistral_serve.api.device_cookies import DeviceCookies
from mistral_serve.api.in_flight import InFlight
from mistral_serve.api.counters import InProcessCounters, RedisCounters
from mistral_serve.api.limits import RateLimiter
from mistral_serve.api.login_throttle import LoginThrottle
from mistral_serve.api.metrics import ServingMetrics
from mistral_serve.api.routes import account_keys, accounts, admin, health, invites, openai, plans, web
from mistral_serve.catalog import Catalog
from mistral_serve.db.key_store import KeyStore
from mistral_serve.db.usage_spool import UsageSpool
from mistral_serve.db.usage_writer import UsageWriter
from mistral_serve.api.local_model import LocalModel
from mistral_serve.api.model_client import ModelClient
from mistral_serve.engine.client import EngineClient
from mistral_serve.settings import Settings

API_STYLES = {"/v1": "OpenAI style", "/api/ai": "Oxen style"}


def create_app(settings: Settings, clients: Mapping[str, EngineClient | ModelClient], db: sessionmaker[Session],
               limiter: RateLimiter | None = None) -> FastAPI:
    """An app serving `clients` (model id → the engine in this process, or a model client such as a
    pool of upstreams) to the keys in `db`, a migrated database. It starts the models and the usage
    writer on startup and stops them on shutdown. `limiter`: by default, counters in Redis when
    settings.redis_url is set, else in this process."""
    catalog = Catalog.from_clients(model_clients(clients), quantization=settings.quantize)
    if limiter is None:
        counters = RedisCounters(settings.redis_url) if settings.redis_url else InProcessCounters()
        limiter = RateLimiter(counters, db)
    usage = UsageWriter(db, UsageSpool(settings.usage_spool_dir))
    keys = KeyStore(db, outage_grace_s=settings.database_outage_grace_s)
    state = ServingState(settings, catalog, keys, ServingMetrics(catalog), limiter, usage,
                         InFlight(settings.max_concurrent_requests_per_key,
                                  settings.max_concurrent_requests_per_account))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.usage.start()
        try:
            async with models_running(state):
                yield
        finally:
            await state.limiter.close()
            await asyncio.to_thread(state.usage.close)  # every request's row is written before we stop

    app = FastAPI(title="mistral-serve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions for Mistral-7B-Instruct.")
    app.state.serving = state
    app.state.login_throttle = LoginThrottle(limiter.counters)  # the limiter's counters: shared with Redis
    app.state.device_cookies = DeviceCookies.in_data_dir(settings.data_dir)
    errors.install(app)
    middleware.install(app, settings.resolved_allowed_hosts)  # Host check, body size limit, nosniff
    openapi.install(app)  # every $ref of /openapi.json resolves
    app.include_router(health.router)
    app.include_router(accounts.router)
    app.include_router(account_keys.router)
    for operators in (admin, plans, invites):  # under /api/admin
        app.include_router(operators.router)
    for prefix, style in API_STYLES.items():
        app.include_router(openai.router, prefix=prefix, tags=[style],
                           generate_unique_id_function=_operation_id(prefix))
    app.include_router(web.router)  # the workbench and dashboard at /
    return app


@asynccontextmanager
async def models_running(state):
    """The catalog's models started, and `state` ready, until the block ends: then stopped."""
    for model in state.catalog:
        await model.client.start()
    state.is_ready = True
    try:
        yield
    finally:
        state.is_ready = False
        for model in state.catalog:
            await model.client.shutdown()


def model_clients(clients: Mapping[str, EngineClient | ModelClient]) -> dict[str, ModelClient]:
    """Each model's client as the chat path takes it: an engine of this process behind a LocalModel."""
    return {model_id: client if isinstance(client, ModelClient) else LocalModel(client)
            for model_id, client in clients.items()}


def _operation_id(prefix: str):
    def generate(route: APIRoute) -> str:
        return f"{route.name}{prefix.replace('/', '_')}"
    return generate
