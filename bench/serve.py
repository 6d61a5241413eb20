"""Serving benchmark: the same streamed chat load against any OpenAI-compatible server.

A fixed, seeded set of chat prompts (the instructions in prompts.json, each padded with seeded
random words to a random length around --prompt-tokens) is sent at each concurrency level (a
closed loop: N clients, each sending its next request when the last one ends) or at each Poisson
request rate (an open loop). Every request asks for exactly --output-tokens tokens, greedy, streamed
with `stream_options.include_usage`; a server that ends a reply early is counted in `num_short`.
Per level it reports request throughput, output tokens/s, time to first token, inter-token latency
and end-to-end latency (p50, p99), and failures; it writes JSON and a PNG chart.

    python bench/serve.py --base-url http://127.0.0.1:8000/v1 --model smollm2-135m-instruct --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field, replace
import json
import os
from pathlib import Path
import random
import sys
import threading
import time

import httpx
import psutil

from serve_report import format_table, machine_load, write_chart
from serve_stats import RequestResult, summarize

PROMPTS_FILE = Path(__file__).with_name("prompts.json")
RESULTS_DIR = Path(__file__).with_name("results")
WORDS_PER_TOKEN = 0.75  # English text in the usual BPE vocabularies; the real count comes back in `usage`


@dataclass(frozen=True)
class Target:
    """A server to load: its OpenAI base URL (ending in /v1) and what every request carries."""

    name: str
    base_url: str
    model: str
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)  # merged into every request: ignore_eos, logit_bias, …
    pid: int | None = None  # the server's process, when known: its peak resident memory is sampled


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 64  # about, for the user message; the chat template adds its own
    output_tokens: int = 128
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    request_rates: tuple[float, ...] = ()  # Poisson arrivals; when given, they replace the concurrencies
    requests_per_stream: int = 2  # a concurrency level sends this many requests per client …
    min_requests: int = 4  # … and at least this many
    num_requests: int | None = None  # or exactly this many per level (request-rate levels: default 16)
    prompt_spread: float = 0.25  # prompt lengths are uniform in (1 ± spread) × prompt_tokens
    temperature: float = 0.0
    seed: int = 0
    warmup_requests: int = 1  # sent before the first level and not counted
    timeout_s: float = 1800.0

    def levels(self) -> list[dict]:
        if self.request_rates:
            return [{"concurrency": None, "request_rate": rate} for rate in self.request_rates]
        return [{"concurrency": c, "request_rate": None} for c in self.concurrencies]

    def num_requests_at(self, level: dict) -> int:
        if self.num_requests is not None:
            return self.num_requests
        if level["concurrency"] is None:
            return 16
        return max(self.min_requests, self.requests_per_stream * level["concurrency"])


def make_prompts(count: int, workload: Workload, start: int = 0) -> list[list[dict]]:
    """Prompts number start … start+count-1 of the workload's fixed sequence: each depends only on
    its number and the seed, so every server gets the same ones, and no two requests share more
    than an instruction (no server gains from caching a whole prompt it saw before)."""
    data = json.loads(PROMPTS_FILE.read_text())
    instructions, words = data["instructions"], data["words"]
    prompts = []
    for index in range(start, start + count):
        rng = random.Random(f"{workload.seed}:{index}")
        instruction = instructions[index % len(instructions)]
        spread = rng.uniform(1 - workload.prompt_spread, 1 + workload.prompt_spread)
        num_words = round(workload.prompt_tokens * WORDS_PER_TOKEN * spread) - len(instruction.split()) - 4
        filler = " ".join(rng.choice(words) for _ in range(max(num_words, 0)))
        content = f"{instruction} Use these words somewhere: {filler}." if filler else instruction
        prompts.append([{"role": "user", "content": content}])
    return prompts


# one request

async def stream_chat(client: httpx.AsyncClient, target: Target, messages: list[dict],
                      workload: Workload) -> RequestResult:
    body = {"model": target.model, "messages": messages, "max_tokens": workload.output_tokens,
            "temperature": workload.temperature, "stream": True, "stream_options": {"include_usage": True},
            **target.extra_body}
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    result = RequestResult(sent_at=time.perf_counter())
    try:
        async with client.stream("POST", f"{target.base_url}/chat/completions", json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
            else:
                await _read_events(response, result)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    result.done_at = time.perf_counter()
    if result.error is None and not result.token_times:
        result.error = "the stream ended with no output"
    return result


async def _read_events(response: httpx.Response, result: RequestResult) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        arrived = time.perf_counter()
        event = json.loads(data)
        if event.get("error"):
            error = event["error"]
            result.error = f"stream error: {error.get('message', error) if isinstance(error, dict) else error}"
            return
        if usage := event.get("usage"):
            result.usage_completion_tokens = usage.get("completion_tokens")
            result.prompt_tokens = usage.get("prompt_tokens")
        if any(_carries_output(choice.get("delta") or {}) for choice in event.get("choices") or ()):
            result.token_times.append(arrived)


def _carries_output(delta: dict) -> bool:
    return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"))


# one level

async def run_level(target: Target, workload: Workload, level: dict, prompts: list[list[dict]]) -> dict:
    results, duration = await send_level(target, workload, level, prompts)
    return {**level, **summarize(results, duration, workload.output_tokens)}


async def send_level(target: Target, workload: Workload, level: dict,
                     prompts: list[list[dict]]) -> tuple[list[RequestResult], float]:
    """Every prompt sent at the level's concurrency or rate: each request's result, and the seconds
    from the first request sent to the last one done."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(workload.timeout_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        if level["concurrency"] is not None:
            results = await _closed_loop(client, target, workload, prompts, level["concurrency"])
        else:
            rng = random.Random(f"{workload.seed}:arrivals:{level['request_rate']}")
            results = await _open_loop(client, target, workload, prompts, level["request_rate"], rng)
    return results, max(r.done_at for r in results) - started


async def _closed_loop(client, target, workload, prompts, concurrency: int) -> list[RequestResult]:
    pending = iter(prompts)  # shared: each client takes the next prompt when its request ends
    results: list[RequestResult] = []

    async def client_loop() -> None:
        for messages in pending:
            results.append(await stream_chat(client, target, messages, workload))

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


async def _open_loop(client, target, workload, prompts, rate: float, rng: random.Random) -> list[RequestResult]:
    tasks = []
    for messages in prompts:
        tasks.append(asyncio.create_task(stream_chat(client, target, messages, workload)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


class PeakRss:
    """Samples the resident memory of a process and its children in a thread; `peak_mb` after exit."""

    def __init__(self, pid: int | None, interval_s: float = 0.1):
        self.process = psutil.Process(pid) if pid else None
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        if self.process:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.process:
            self._thread.join()

    def _sample(self) -> None:
        while True:
            try:
                rss = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
            except psutil.Error:  # the server ended, or a child did between listing and reading
                rss = 0
            self.peak_mb = max(self.peak_mb or 0.0, rss / 1e6)  # decimal MB, as memory limits are stated
            if self._stop.wait(self.interval_s):
                return


# one server, every level

def run_server(target: Target, workload: Workload, log=print) -> dict:
    """Warm the server up, then run every level of the workload against it."""
    warmup = make_prompts(workload.warmup_requests, replace(workload, seed=workload.seed + 1))
    for messages in warmup:
        stats = asyncio.run(run_level(target, workload, {"concurrency": 1, "request_rate": None}, [messages]))
        if stats["num_failures"]:
            log(f"{target.name}: the warm-up request failed: {stats['errors'][0]}")
    levels, start = [], 0
    for level in workload.levels():
        count = workload.num_requests_at(level)
        prompts = make_prompts(count, workload, start)
        start += count
        with PeakRss(target.pid) as rss:
            stats = asyncio.run(run_level(target, workload, level, prompts))
        stats["peak_rss_mb"] = rss.peak_mb
        levels.append(stats)
        log(f"{target.name}: {_level_name(level)}: {stats['output_tokens_per_s']:.1f} output tok/s, "
            f"{stats['num_failures']} failed, {stats['duration_s']:.1f} s")
    return {"name": target.name, "base_url": target.base_url, "model": target.model,
            "extra_body": target.extra_body, "levels": levels}


def _level_name(level: dict) -> str:
    if level["concurrency"] is not None:
        return f"concurrency {level['concurrency']}"
    return f"{level['request_rate']} req/s"


def make_report(servers: list[dict], workload: Workload, load_before: list[float], notes: dict | None = None) -> dict:
    return {"benchmark": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_count": os.cpu_count(),
            "load_average": {"start": load_before, "end": machine_load()},
            "workload": {**workload.__dict__, "levels": workload.levels()},
            "notes": notes or {}, "servers": servers}


def write_report(report: dict, json_path: Path, chart_path: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    if chart_path:
        write_chart(report, chart_path)


# command line

def add_workload_flags(parser: argparse.ArgumentParser, defaults: Workload = Workload()) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens,
                        help="about how long each user message is, in tokens (default %(default)s)")
    parser.add_argument("--output-tokens", type=int, default=defaults.output_tokens,
                        help="tokens asked for per request (default %(default)s)")
    parser.add_argument("--concurrency", default=",".join(map(str, defaults.concurrencies)),
                        help="comma-separated concurrency levels (default %(default)s)")
    parser.add_argument("--request-rate", default="",
                        help="comma-separated Poisson request rates (req/s), instead of concurrency levels")
    parser.add_argument("--num-requests", type=int, help="requests per level (default: max(min-requests, "
                                                         "requests-per-stream × concurrency); 16 per rate)")
    parser.add_argument("--requests-per-stream", type=int, default=defaults.requests_per_stream)
    parser.add_argument("--min-requests", type=int, default=defaults.min_requests)
    parser.add_argument("--prompt-spread", type=float, default=defaults.prompt_spread)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--warmup-requests", type=int, default=defaults.warmup_requests)
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request")


def workload_from(args: argparse.Namespace) -> Workload:
    def numbers(text: str, kind) -> tuple:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    workload = Workload(
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
        concurrencies=numbers(args.concurrency, int), request_rates=numbers(args.request_rate, float),
        requests_per_stream=args.requests_per_stream, min_requests=args.min_requests, num_requests=args.num_requests,
        prompt_spread=args.prompt_spread, temperature=args.temperature, seed=args.seed,
        warmup_requests=args.warmup_requests, timeout_s=args.timeout)
    if not workload.levels() or any(c < 1 for c in workload.concurrencies) or any(
            r <= 0 for r in workload.request_rates):
        raise ValueError("give at least one concurrency level (each >= 1) or request rate (each > 0)")
    if workload.output_tokens < 1 or workload.prompt_tokens < 1:
        raise ValueError("--output-tokens and --prompt-tokens must be at least 1")
    return workload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="the server's OpenAI base URL, e.g. http://HOST:PORT/v1")
    parser.add_argument("--model", required=True, help="the model id to ask for")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--name", help="the server's name in the table and chart (default: the base URL)")
    parser.add_argument("--extra-body", type=json.loads, default={},
                        help='JSON merged into every request, e.g. \'{"ignore_eos": true}\'')
    parser.add_argument("--ban-tokens", default="",
                        help="comma-separated token ids sent with logit_bias -100 (e.g. the EOS ids), so "
                             "that replies run to --output-tokens on servers without ignore_eos")
    parser.add_argument("--server-pid", type=int, help="sample this process's peak resident memory")
    add_workload_flags(parser)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "serve-url.json", help="JSON report")
    parser.add_argument("--chart", type=Path, help="PNG chart (default: the JSON path with .png)")
    parser.add_argument("--no-chart", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workload = workload_from(args)
    extra_body = dict(args.extra_body)
    if args.ban_tokens:
        bans = {str(int(token_id)): -100 for token_id in args.ban_tokens.split(",")}
        extra_body["logit_bias"] = {**extra_body.get("logit_bias", {}), **bans}
    target = Target(args.name or args.base_url, args.base_url.rstrip("/"), args.model, args.api_key,
                    extra_body, args.server_pid)
    load_before = machine_load()
    report = make_report([run_server(target, workload)], workload, load_before)
    chart = None if args.no_chart else args.chart or args.output.with_suffix(".png")
    write_report(report, args.output, chart)
    print(format_table(report))
    print(f"wrote {args.output}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
