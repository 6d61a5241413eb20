"""A streaming chat client for load tests: what one request saw, timed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import json
import time

import httpx


@dataclass
class Outcome:
    status: int
    retry_after: str | None = None
    ttft_s: float | None = None  # to the first content
    text: str = ""
    num_content_chunks: int = 0
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None  # the error body, or an error event inside the stream
    request_id: str | None = None
    saw_done: bool = False

    @property
    def is_complete(self) -> bool:
        """A stream that ran to its end with no error."""
        return self.status == 200 and self.error is None and self.finish_reason is not None and self.saw_done


async def stream_chat(client: httpx.AsyncClient, base_url: str, key: str, body: dict, *,
                      close_after_chunks: int | None = None,
                      on_first_content: Callable[[], None] | None = None) -> Outcome:
    """POST a streaming chat request with usage; read it all, or close the connection after
    `close_after_chunks` content chunks."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    async with client.stream("POST", base_url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        outcome = Outcome(response.status_code, response.headers.get("retry-after"))
        if response.status_code != 200:
            await response.aread()
            outcome.error = response.json().get("error")
            return outcome
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                outcome.saw_done = True
                break
            event = json.loads(line[len("data: "):])
            if "error" in event:
                outcome.error = event["error"]
                continue
            outcome.request_id = event["id"]
            outcome.usage = event.get("usage") or outcome.usage
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    if outcome.ttft_s is None:
                        outcome.ttft_s = time.perf_counter() - started
                        if on_first_content is not None:
                            on_first_content()
                    outcome.text += choice["delta"]["content"]
                    outcome.num_content_chunks += 1
                outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
            if close_after_chunks is not None and outcome.num_content_chunks >= close_after_chunks:
                break  # leaving the block closes the connection mid-stream
    return outcome


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def metric(base_url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples on /metrics (every model)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))
