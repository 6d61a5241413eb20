"""What a pool learns from its upstreams when it starts: the context length they serve the model with."""

from __future__ import annotations

import logging

import httpx

from mistral_serve.upstream.config import PoolSpec

logger = logging.getLogger(__name__)

# where each kind of upstream writes it in its model object: ours, vLLM and SGLang, llama.cpp's server
_CONTEXT_FIELDS = ("context_length", "max_model_len")


async def discover_max_model_len(spec: PoolSpec) -> tuple[int | None, int]:
    """The smallest context length the upstreams that answer report for the model (`GET {url}/models`),
    so that no request the gateway lets through is too long for the upstream it reaches (None when
    none says), and how many answered at all (a router such as smg answers without one)."""
    lengths, num_answered = [], 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(spec.health_timeout_s, connect=spec.connect_timeout_s)) as http:
        for upstream in spec.upstreams:
            headers = {"Authorization": f"Bearer {upstream.token}"} if upstream.token else {}
            try:
                response = await http.get(upstream.url + "/models", headers=headers)
                response.raise_for_status()
                models = response.json().get("data") or []
            except (httpx.HTTPError, ValueError, AttributeError) as error:
                logger.warning("pool %s: %s did not say its context length (%s)", spec.model_id, upstream.name,
                               type(error).__name__)
                continue
            num_answered += 1
            name = upstream.model or spec.model_id
            for model in models:
                if isinstance(model, dict) and model.get("id") == name and (length := _context_length(model)):
                    lengths.append(length)
    return (min(lengths) if lengths else None), num_answered


def _context_length(model: dict) -> int | None:
    for field in _CONTEXT_FIELDS:
        value = model.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    meta = model.get("meta")  # llama.cpp's server: the context it was trained with
    value = meta.get("n_ctx_train") if isinstance(meta, dict) else None
    return value if isinstance(value, int) and value > 0 else None
