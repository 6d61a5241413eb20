"""The gateway's own overhead: the same streamed load straight to one engine and through a gateway to it.

One `mistral-serve engine` is started on loopback, and one `mistral-serve serve --upstream` in front
of it (a data dir of its own, one API key). At each concurrency level the benchmark runs --rounds
rounds; each round sends the same fixed prompts (serve.py's workload: seeded, greedy, every reply
run to --output-tokens with `ignore_eos`) once straight to the engine and once through the gateway,
the order swapped every round (A B, B A, …), so that the engine process, its warm caches and any
drift of the machine's load weigh on both paths alike. Warm-up requests go to both paths first.

    python bench/gateway_overhead.py                          # 1 and 8 clients, 6 rounds, 64 tokens out
    python bench/gateway_overhead.py --concurrency 1 --rounds 10 --output-tokens 16

How to read the numbers

- **added TTFT** is the gateway's p50 (p90) time to first token minus the engine's, over every
  streamed request of the level. It is what a client waits for the gateway: its auth and limits,
  tokenizing the prompt, opening the upstream stream, relaying the first chunk. The interval beside
  the p50 is a 90% bootstrap interval of the difference: when it holds 0, the run cannot tell the
  gateway from noise; when it is wide, run more rounds. The target is < 5 ms at p50.
- **throughput loss** is 1 − gateway output tok/s ÷ engine output tok/s at the same concurrency
  (tokens over the summed wall time of the level's rounds). The target is < 3 %.
- **gateway CPU ms/req** is the CPU time the gateway process used per request it relayed. Here the
  engine, the gateway and this load generator share the machine's cores, so every CPU millisecond
  the gateway spends is also taken from the engine: on a small machine both the added TTFT and the
  throughput loss come out higher than for a gateway on a machine of its own. CPU ms/req times the
  request rate says how much of a core a gateway needs (the JSON's engine path holds the gateway's
  CPU while idle: its health checks).
- A negative overhead is noise (the engine path cannot gain from a proxy); compare the runs' load
  averages, printed under the table, and rerun on a quieter machine when they differ much.

Results go to bench/results/gateway_overhead.json (git-ignored), with both paths' full statistics.
"""

from __future__ import annotations

import argparse
import asyncio
from contextlib import ExitStack
from dataclasses import replace
import os
from pathlib import Path
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time

import psutil

from peers import MISTRAL_SERVE, Launch, _create_key, _free_port, running
from serve import RESULTS_DIR, Target, Workload, add_workload_flags, make_prompts, send_level, workload_from, \
    write_report
from serve_report import machine_load
from serve_stats import RequestResult, percentile, summarize

from mistral_serve.catalog import DEMO_MODEL_ID as MODEL

TOKEN_VARIABLE = "MISTRAL_SERVE_ENGINE_TOKEN"  # the engine reads its token there; the gateway is told to
MAX_ADDED_TTFT_MS = 5.0  # the targets: p50 added time to first token …
MAX_THROUGHPUT_LOSS = 0.03  # … and output tokens/s lost at a fixed concurrency
DEFAULT_WORKLOAD = Workload(output_tokens=64, concurrencies=(1, 8), warmup_requests=4)
PATHS = ("engine", "gateway")


def launch_engine(model_source: str, threads: int, port: int, token: str) -> Launch:
    return Launch([str(MISTRAL_SERVE), "engine", "--model", f"{MODEL}={model_source}", "--threads", str(threads),
                   "--port", str(port)], MODEL, {"ignore_eos": True}, token, "/health", env={TOKEN_VARIABLE: token})


def launch_gateway(engine_port: int, port: int, data_dir: Path, token: str) -> Launch:
    return Launch([str(MISTRAL_SERVE), "serve", "--upstream", f"{MODEL}=http://127.0.0.1:{engine_port}/v1",
                   "--upstream-token-env", TOKEN_VARIABLE, "--data-dir", str(data_dir), "--port", str(port)],
                  MODEL, {"ignore_eos": True}, _create_key(data_dir), "/ready", env={TOKEN_VARIABLE: token})


def pinned(engine: Launch, gateway: Launch) -> tuple[Launch, Launch]:
    """The engine on the first core, the gateway and this process (the load generator) on the second."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs two cores")
    os.sched_setaffinity(0, {cores[1]})
    return (replace(engine, command=["taskset", "-c", str(cores[0]), *engine.command]),
            replace(gateway, command=["taskset", "-c", str(cores[1]), *gateway.command]))


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# the load, both paths

def measure_level(targets: dict[str, Target], workload: Workload, level: dict, rounds: int, first_prompt: int) -> dict:
    """Each round's prompts to both paths, alternating which goes first; every path's results pooled."""
    count = workload.num_requests_at(level)
    results: dict[str, list[RequestResult]] = {path: [] for path in PATHS}
    durations = dict.fromkeys(PATHS, 0.0)
    cpu_s = dict.fromkeys(PATHS, 0.0)  # the gateway process's CPU time while each path was loaded
    for index in range(rounds):
        prompts = make_prompts(count, workload, first_prompt + index * count)
        for path in PATHS if index % 2 == 0 else reversed(PATHS):
            cpu_before = _cpu_s(targets["gateway"].pid)
            done, duration = asyncio.run(send_level(targets[path], workload, level, prompts))
            cpu_s[path] += _cpu_s(targets["gateway"].pid) - cpu_before
            results[path] += done
            durations[path] += duration
    return compare(level["concurrency"], results, durations, workload.output_tokens, cpu_s)


def compare(concurrency: int, results: dict[str, list[RequestResult]], durations: dict[str, float],
            max_tokens: int, cpu_s: dict[str, float]) -> dict:
    """Both paths' statistics, and what the gateway added to them."""
    paths = {}
    for path in PATHS:
        ttfts = [r.ttft for r in results[path] if r.is_ok and r.ttft is not None]
        paths[path] = {**summarize(results[path], durations[path], max_tokens),
                       "ttft_s_p90": percentile(ttfts, 90), "ttfts_s": ttfts,
                       "gateway_cpu_ms_per_request": 1000 * cpu_s[path] / len(results[path])}
    engine, gateway = paths["engine"], paths["gateway"]
    stats = {"concurrency": concurrency, "paths": paths, "throughput_loss": (
        1 - gateway["output_tokens_per_s"] / engine["output_tokens_per_s"] if engine["output_tokens_per_s"] else None)}
    for q in (50, 90):
        if engine[f"ttft_s_p{q}"] is not None and gateway[f"ttft_s_p{q}"] is not None:
            stats[f"added_ttft_ms_p{q}"] = 1000 * (gateway[f"ttft_s_p{q}"] - engine[f"ttft_s_p{q}"])
    stats["added_ttft_ms_p50_interval"] = bootstrap_interval(engine["ttfts_s"], gateway["ttfts_s"], 50)
    stats["meets_ttft_target"] = stats.get("added_ttft_ms_p50", float("inf")) < MAX_ADDED_TTFT_MS
    stats["meets_throughput_target"] = stats["throughput_loss"] is not None and \
        stats["throughput_loss"] < MAX_THROUGHPUT_LOSS
    return stats


def bootstrap_interval(direct: list[float], relayed: list[float], q: float, num_resamples: int = 1000,
                       confidence: float = 0.9) -> list[float] | None:
    """The `confidence` interval of (relayed − direct) q-th percentile, in ms, from resampling both."""
    if not direct or not relayed:
        return None
    rng = random.Random(0)
    differences = sorted(percentile(rng.choices(relayed, k=len(relayed)), q)
                         - percentile(rng.choices(direct, k=len(direct)), q) for _ in range(num_resamples))
    tail = (1 - confidence) / 2
    return [1000 * differences[int(tail * num_resamples)], 1000 * differences[int((1 - tail) * num_resamples) - 1]]


def warm_up(targets: dict[str, Target], workload: Workload) -> None:
    prompts = make_prompts(workload.warmup_requests, replace(workload, seed=workload.seed + 1))
    for path in PATHS:
        results, _ = asyncio.run(send_level(targets[path], workload, {"concurrency": 1, "request_rate": None},
                                            prompts))
        if failed := [r.error for r in results if not r.is_ok]:
            raise RuntimeError(f"{path}: a warm-up request failed: {failed[0]}")


# the report

def format_table(report: dict) -> str:
    columns = ["clients", "req/path", "engine tok/s", "gateway tok/s", "throughput loss", "TTFT p50 ms engine",
               "gateway", "added p50 ms (90% CI)", "TTFT p90 ms engine", "gateway", "added p90 ms",
               "gateway CPU ms/req", "failed"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for level in report["levels"]:
        engine, gateway = level["paths"]["engine"], level["paths"]["gateway"]
        loss = level["throughput_loss"]
        row = [str(level["concurrency"]), str(engine["num_requests"]), f"{engine['output_tokens_per_s']:.1f}",
               f"{gateway['output_tokens_per_s']:.1f}", "—" if loss is None else f"{100 * loss:+.1f} %",
               _ms(engine["ttft_s_p50"]), _ms(gateway["ttft_s_p50"]),
               _added(level.get("added_ttft_ms_p50"), level["added_ttft_ms_p50_interval"]),
               _ms(engine["ttft_s_p90"]), _ms(gateway["ttft_s_p90"]), _added(level.get("added_ttft_ms_p90")),
               f"{gateway['gateway_cpu_ms_per_request']:.1f}",
               f"{engine['num_failures'] + gateway['num_failures']}/{2 * engine['num_requests']}"]
        lines.append("| " + " | ".join(row) + " |")
    for level in report["levels"]:
        lines.append(f"{level['concurrency']} client(s): added TTFT p50 < {MAX_ADDED_TTFT_MS:g} ms "
                     f"{_verdict(level['meets_ttft_target'])}; throughput loss < {100 * MAX_THROUGHPUT_LOSS:g} % "
                     f"{_verdict(level['meets_throughput_target'])}")
    load, notes = report["load_average"], report["notes"]
    lines.append(f"\n{notes['shared_cores']}")
    lines.append(f"load average (1, 5, 15 min) at start {load['start']}, at end {load['end']}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.1f}"


def _added(ms: float | None, interval: list[float] | None = None) -> str:
    if ms is None:
        return "—"
    return f"{ms:+.1f}" + (f" ({interval[0]:+.1f} … {interval[1]:+.1f})" if interval else "")


def _verdict(is_met: bool) -> str:
    return "met" if is_met else "MISSED"


# command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-source", default="demo",
                        help=f"the checkpoint the engine serves as {MODEL} (default: the demo GGUF)")
    parser.add_argument("--threads", type=int, default=1, help="the engine's CPU threads (default %(default)s: "
                                                               "on 2 cores, one is left to the gateway)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per level, each path once a round "
                                                              "(default %(default)s)")
    add_workload_flags(parser, DEFAULT_WORKLOAD)
    parser.add_argument("--output", "--out", type=Path, default=RESULTS_DIR / "gateway_overhead.json",
                        help="JSON report (default %(default)s)")
    parser.add_argument("--pin", action="store_true",
                        help="the engine on the first core, the gateway and this load generator on the second (with "
                             "taskset; needs 2 cores): the gateway no longer takes its CPU time from the engine's")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (their folder is printed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill stops both servers too
    workload = workload_from(args)
    if workload.request_rates or args.rounds < 1:
        raise SystemExit("this benchmark runs closed loops at fixed concurrencies, at least one round each")
    work_dir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    token = secrets.token_urlsafe(24)
    engine_port, gateway_port = _free_port(), _free_port()
    load_before = machine_load()
    with ExitStack() as servers:
        engine_launch = launch_engine(args.model_source, args.threads, engine_port, token)
        gateway_launch = launch_gateway(engine_port, gateway_port, work_dir / "gateway-data", token)
        if args.pin:
            engine_launch, gateway_launch = pinned(engine_launch, gateway_launch)
        engine = servers.enter_context(running("engine", engine_launch, engine_port, args.threads,
                                               work_dir / "engine.log"))
        gateway = servers.enter_context(running("gateway", gateway_launch, gateway_port, 1, work_dir / "gateway.log"))
        targets = {"engine": Target("engine", f"http://127.0.0.1:{engine_port}/v1", MODEL, token,
                                    engine_launch.extra_body, engine.pid),
                   "gateway": Target("gateway", f"http://127.0.0.1:{gateway_port}/v1", MODEL, gateway_launch.api_key,
                                     gateway_launch.extra_body, gateway.pid)}
        print(f"engine on :{engine_port} ({args.threads} thread(s)), gateway on :{gateway_port}; warming up",
              flush=True)
        warm_up(targets, workload)
        levels, first_prompt = [], 0
        for level in workload.levels():
            started = time.monotonic()
            levels.append(measure_level(targets, workload, level, args.rounds, first_prompt))
            first_prompt += args.rounds * workload.num_requests_at(level)
            print(f"{level['concurrency']} client(s): {time.monotonic() - started:.0f} s", flush=True)
    shared = ("pinned: the engine on one core, the gateway and this load generator on the other" if args.pin else
              f"the engine ({args.threads} thread(s)), the gateway and this load generator shared this machine's "
              f"{len(os.sched_getaffinity(0))} cores: the gateway's CPU time is taken from the engine's, which "
              "inflates both overheads against a gateway on a machine of its own")
    report = {"benchmark": "gateway_overhead", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "cpu_count": os.cpu_count(), "load_average": {"start": load_before, "end": machine_load()},
              "workload": workload.__dict__, "rounds": args.rounds,
              "targets": {"max_added_ttft_ms_p50": MAX_ADDED_TTFT_MS, "max_throughput_loss": MAX_THROUGHPUT_LOSS},
              "notes": {"model_source": args.model_source, "engine_threads": args.threads, "shared_cores": shared},
              "levels": levels}
    write_report(report, args.output, None)
    print(format_table(report))
    print(f"wrote {args.output}")
    if args.keep_logs:
        print(f"server logs: {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if all(p["num_failures"] == 0 for level in levels for p in level["paths"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
