"""EngineTicket: a chat request's life inside `mistral-serve engine`, which has no accounts.

The gateway in front has admitted the request, charged its limits and will write its usage row; the
engine only runs it. So this ticket has RequestTicket's surface (chat.py and chat_replies.py take
either) with none of its bookkeeping: no limits to reserve against, no row to write. It keeps the
gateway's request id, so one id names the request in both logs, and the tenant the gateway names,
so the engine's fair scheduling sees the gateway's tenants rather than one client.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.requests import Request

from mistral_serve.api.admission import GenerationEnd

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
TENANT_HEADER = "x-mistral-serve-tenant"  # set by the gateway: "account/key"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:/-]{1,64}")  # printed in logs and echoed in replies


class EngineRequests:
    """The chat requests this engine is answering: a graceful shutdown waits for the last one."""

    def __init__(self) -> None:
        self.total = 0


class EngineTicket:
    def __init__(self, request: Request, requests: EngineRequests):
        given_id = request.headers.get(REQUEST_ID_HEADER, "")
        self.request_id = given_id if _SAFE_ID.fullmatch(given_id) else f"chatcmpl-{uuid.uuid4().hex}"
        given_tenant = request.headers.get(TENANT_HEADER, "")
        self.tenant = given_tenant if _SAFE_ID.fullmatch(given_tenant) else "gateway"
        self.end: GenerationEnd | None = None
        self._started = time.perf_counter()
        self._requests = requests
        self._is_kept_open = False
        self._is_closed = False
        requests.total += 1

    @property
    def account_id(self) -> str:
        """Whose grammar compilations are counted together: the tenant's account."""
        return self.tenant.split("/")[0]

    @property
    def headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}

    async def reserve(self, num_prompt_tokens: int, n: int, max_tokens: int | None, default_max_tokens: int) -> int:
        """No limits here: the gateway charged them before forwarding."""
        return default_max_tokens if max_tokens is None else max_tokens

    def on_first_token(self) -> None:
        pass

    def on_generation_end(self, end: GenerationEnd) -> None:
        self.end = end

    def keep_open(self) -> EngineTicket:
        self._is_kept_open = True
        return self

    def close(self, error: BaseException | None = None) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._requests.total -= 1
        end = self.end
        if end is not None:  # one line per request that reached the model, as the gateway logs its own
            logger.info("%s tenant %s: %s %d, %d prompt + %d completion tokens, %.0f ms", self.request_id,
                        self.tenant, end.status, end.http_status, end.num_prompt_tokens, end.num_completion_tokens,
                        (time.perf_counter() - self._started) * 1000)

    async def __aenter__(self) -> EngineTicket:
        return self

    async def __aexit__(self, exc_type, error: BaseException | None, traceback) -> None:
        if error is None and self._is_kept_open:
            return  # a stream holds it now, and closes it when it ends
        self.close(error)
