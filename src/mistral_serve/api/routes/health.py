"""Liveness, readiness and metrics, for load balancers, orchestrators and monitoring."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from mistral_serve.api.deps import Ready, State

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State, _: Ready) -> dict:
    """Every model is loaded and its engine running (503 otherwise), and where and on which kernels each
    runs; whether the database takes usage rows, and how many bytes of them wait on disk until it does."""
    return {"status": "ready", "models": [model.id for model in state.catalog],
            "backends": {model.id: model.client.backend.as_dict() for model in state.catalog
                         if model.client.backend is not None},
            "upstreams": {model.id: [asdict(member) for member in members]
                          for model in state.catalog if (members := model.client.upstreams())},
            "database": "reachable" if state.usage.is_database_reachable else "unreachable",
            "usage_backlog_bytes": await asyncio.to_thread(state.usage.backlog_bytes)}


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus metrics per model: running and waiting requests, KV blocks, latencies, tokens."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
