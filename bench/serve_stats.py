"""What one streamed request measured, and the statistics of a load level over many of them.

Plain Python and no I/O, so the numbers can be checked against known timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import math


@dataclass
class RequestResult:
    """One streamed chat request. Times are `time.perf_counter()` seconds."""

    sent_at: float
    done_at: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    usage_completion_tokens: int | None = None  # from the usage chunk, when the server sends one
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        """The server's own count when it gives one; else one token per chunk that carried output."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None

    @property
    def e2e(self) -> float:
        return self.done_at - self.sent_at

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output chunks (a chunk of several tokens is one gap)."""
        return [later - earlier for earlier, later in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: the decode rate this request saw."""
        if self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.done_at - self.token_times[0]) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; None when empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lower, upper = math.floor(rank), math.ceil(rank)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(results: Sequence[RequestResult], duration_s: float, max_tokens: int) -> dict:
    """The statistics of one level: `duration_s` is from the first request sent to the last one done.

    Throughputs count successful requests only; a request that returned fewer than `max_tokens`
    tokens (the server stopped early) is counted in `num_short`, since it makes the level lighter.
    """
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [r for r in results if r.is_ok]
    output_tokens = [r.output_tokens for r in done]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    itls = [gap for r in done for gap in r.itls]
    tpots = [r.tpot for r in done if r.tpot is not None]
    e2es = [r.e2e for r in done]
    sources = {"usage" if r.usage_completion_tokens is not None else "chunks" for r in done}
    stats = {
        "num_requests": len(results),
        "num_failures": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.is_ok})[:3],
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_tokens_per_s": sum(output_tokens) / duration_s,
        "total_output_tokens": sum(output_tokens),
        "mean_output_tokens": _mean(output_tokens),
        "num_short": sum(1 for n in output_tokens if n < max_tokens),
        "mean_prompt_tokens": _mean([r.prompt_tokens for r in done if r.prompt_tokens is not None]),
        "token_count_source": "/".join(sorted(sources)) or None,
        "tpot_s_p50": percentile(tpots, 50),
    }
    for name, values in (("ttft_s", ttfts), ("itl_s", itls), ("e2e_s", e2es)):
        stats[f"{name}_p50"] = percentile(values, 50)
        stats[f"{name}_p99"] = percentile(values, 99)
    return stats
