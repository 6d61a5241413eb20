"""GracefulServer: uvicorn, with the shutdown a deploy needs.

On the first SIGTERM (or SIGINT) the server stops taking work: `/ready` and new chat requests answer
503 with Retry-After, so a load balancer moves traffic elsewhere, while requests in flight go on.
When the last one has ended, or `shutdown_timeout_s` has passed, the engines abort what is left
(each stream ends with a final error event, each non-streaming request gets a 503), uvicorn closes
the connections, the application's shutdown writes every usage row, and the process exits with 0.
A second signal stops at once.
"""

from __future__ import annotations

import logging
import time

import uvicorn

from mistral_serve.api.deps import ServingState

logger = logging.getLogger(__name__)

ABORT_GRACE_S = 5.0  # after aborting, how long the aborted requests may take to send their last bytes


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServingState):
        super().__init__(config)
        self.state = state
        self.drain_deadline: float | None = None
        self.abort_deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_deadline is None:
            # a signal handler: only flags here; on_tick does the rest on the event loop
            self.drain_deadline = time.monotonic() + self.state.settings.shutdown_timeout_s
            self.state.is_ready = False
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            self._drain()
        return await super().on_tick(counter)

    def _drain(self) -> None:
        num_in_flight = self.state.in_flight.total
        now = time.monotonic()
        if num_in_flight == 0:
            logger.info("no request in flight: shutting down")
            self.should_exit = True
        elif self.abort_deadline is None:
            if now >= self.drain_deadline:
                logger.warning("shutdown timeout (%g s) reached: aborting %d request(s) still in flight",
                               self.state.settings.shutdown_timeout_s, num_in_flight)
                for model in self.state.catalog:
                    model.client.abort_all("the server is shutting down")
                self.abort_deadline = now + ABORT_GRACE_S
        elif now >= self.abort_deadline:
            logger.error("%d aborted request(s) did not end in %g s: shutting down anyway", num_in_flight,
                         ABORT_GRACE_S)
            self.should_exit = True
