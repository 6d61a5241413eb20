"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter

from mistral_serve.api.deps import Ready, State

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State, _: Ready) -> dict:
    """Every model is loaded and its engine running (503 otherwise)."""
    return {"status": "ready", "models": [model.id for model in state.catalog]}
