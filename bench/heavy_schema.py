"""Heavy JSON schemas against a trivial request: does one account's grammar work slow down another's?

Starts a real `mistral-serve serve` on the demo model, with keys of 1 + --attackers accounts
(`mistral-serve keys create`). One account (the victim) sends a trivial request (a short prompt,
--max-tokens tokens, one at a time) --requests times alone, and as many times while every attacker,
an account of its own, sends 200-property JSON schemas (response_format json_schema) in a loop — a
new schema on every request unless --same-schema, so that each one has to be compiled. The two
phases alternate in --blocks blocks, so that other load on the machine weighs on both. It reports the
victim's median and p90 latency in both phases and their ratio, and how the attackers' requests
ended (compiled and answered, or refused: 429 one compilation per account, 503 all compilers busy).

Before the serving phases it measures, in this process, what one such schema costs to compile:
in process, through a warm grammar worker (compiled again here), and carried over serialised
(the cost of reading it back).

    python bench/heavy_schema.py [--attackers 6] [--properties 200] [--requests 40] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from peers import MISTRAL_SERVE, Launch, running
from serve_report import machine_load
from serve_stats import percentile

RESULTS_DIR = Path(__file__).with_name("results")
VICTIM_PROMPT = "Say hello."
ATTACK_PROMPT = "Fill in this form about a made-up person, as JSON."


def schema(num_properties: int, tag: str) -> dict:
    """A flat object of `num_properties` required properties of four kinds; `tag` makes it distinct."""
    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer", "minimum": 0, "maximum": 10_000},
             {"type": "boolean"}, {"enum": ["red", "green", "blue", "none"]}]
    properties = {f"{tag}_field_{i}": kinds[i % len(kinds)] for i in range(num_properties)}
    return {"type": "object", "properties": properties, "required": list(properties)}


# what one schema costs to compile, measured here

def compile_costs(num_properties: int) -> dict:
    from mistral_serve.engine.grammar_worker_pool import GrammarWorkerPool
    from mistral_serve.engine.guided import CompiledGrammar, compile_guided, new_compiler, tokenizer_info
    from mistral_serve.engine.params import GuidedDecoding
    from mistral_serve.model.checkpoints.loader import find_demo_gguf
    from mistral_serve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(find_demo_gguf())
    info = tokenizer_info(tokenizer.grammar_vocab(), tokenizer.vocab_size, tokenizer.eos_token_ids)
    compiler = new_compiler(info, max_threads=1)

    def timed(work) -> tuple[float, object]:
        started = time.perf_counter()
        result = work()
        return time.perf_counter() - started, result

    specs = iter(GuidedDecoding.json_schema(schema(num_properties, f"c{i}")) for i in range(1_000))
    in_process_s = statistics.median(timed(lambda: compile_guided(compiler, next(specs)))[0] for _ in range(5))
    grammar = compile_guided(compiler, next(specs))
    serialize_s, grammar_json = timed(grammar.serialize_json)
    deserialize_s, _ = timed(lambda: CompiledGrammar.deserialize_json(grammar_json, info))

    async def through(pool: GrammarWorkerPool) -> float:
        await pool.compile(next(specs))  # the worker's start, not measured
        times = []
        for _ in range(5):
            started = time.perf_counter()
            await pool.compile(next(specs))
            times.append(time.perf_counter() - started)
        pool.close()
        return statistics.median(times)

    worker_s = asyncio.run(through(GrammarWorkerPool(tokenizer, tokenizer.vocab_size)))
    carried_s = asyncio.run(through(GrammarWorkerPool(tokenizer, tokenizer.vocab_size, max_recompile_cpu_s=0.0)))
    return {"num_properties": num_properties, "in_process_s": in_process_s, "worker_s": worker_s,
            "worker_carried_s": carried_s, "serialize_s": serialize_s, "deserialize_s": deserialize_s,
            "serialized_mb": len(grammar_json) / 1e6, "grammar_mb": grammar.memory_size_bytes / 1e6}


# the server under attack

@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)  # (sent at, seconds, status)

    def count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def ask(client: httpx.AsyncClient, body: dict, tally: Tally) -> None:
    started = time.perf_counter()
    try:
        response = await client.post("/chat/completions", json=body)
        status = str(response.status_code)
        if response.status_code != 200:
            status += f" {response.json().get('error', {}).get('code')}"
    except httpx.HTTPError as error:
        status = type(error).__name__
    tally.count(status)
    tally.timeline.append((round(started, 3), round(time.perf_counter() - started, 3), status))
    if status == "200":
        tally.latencies_s.append(time.perf_counter() - started)


async def victim_phase(client: httpx.AsyncClient, model: str, num_requests: int, max_tokens: int,
                       tally: Tally) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": VICTIM_PROMPT}], "max_tokens": max_tokens,
            "temperature": 0}
    for _ in range(num_requests):
        await ask(client, body, tally)


async def attacker(client: httpx.AsyncClient, model: str, name: str, args: argparse.Namespace, tally: Tally) -> None:
    round_ = 0
    while True:
        tag = name if args.same_schema else f"{name}r{round_}"
        round_ += 1
        await ask(client, {"model": model, "messages": [{"role": "user", "content": ATTACK_PROMPT}],
                           "max_tokens": args.max_tokens, "response_format": {
                               "type": "json_schema",
                               "json_schema": {"name": "form", "schema": schema(args.properties, tag)}}}, tally)


async def serving_phases(base_url: str, model: str, victim_key: str, attacker_keys: list[str],
                         args: argparse.Namespace) -> dict:
    """Alone and under attack, in alternating blocks, so that whatever else loads the machine weighs
    on both alike."""
    def client_of(key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300)

    victim = client_of(victim_key)
    attackers = [client_of(key) for key in attacker_keys]
    await victim_phase(victim, model, 3, args.max_tokens, Tally())  # warm-up
    alone, under_attack, attack = Tally(), Tally(), Tally()
    attack_s = 0.0
    for block in range(args.blocks):
        num_requests = args.requests // args.blocks
        await victim_phase(victim, model, num_requests, args.max_tokens, alone)
        started = time.perf_counter()
        attacks = [asyncio.create_task(attacker(client, model, f"a{i}b{block}", args, attack))
                   for i, client in enumerate(attackers)]
        await asyncio.sleep(args.attack_warmup)
        await victim_phase(victim, model, num_requests, args.max_tokens, under_attack)
        for task in attacks:  # the attackers hang up: their compilations and generations stop
            task.cancel()
        await asyncio.gather(*attacks, return_exceptions=True)
        attack_s += time.perf_counter() - started
        # the aborted requests leave the engine, and the workers killed with them are replaced
        await asyncio.sleep(args.settle)
    for client in [victim, *attackers]:
        await client.aclose()
    return {"alone": _latency(alone), "under_attack": _latency(under_attack),
            "attackers": {"num_accounts": len(attacker_keys), "statuses": attack.statuses, "seconds": attack_s,
                          "timeline": attack.timeline}}


def _latency(tally: Tally) -> dict:
    values = tally.latencies_s
    return {"num_ok": len(values), "statuses": tally.statuses,
            "median_s": statistics.median(values) if values else None, "p90_s": percentile(values, 90),
            "max_s": max(values, default=None), "timeline": tally.timeline}


def create_key(data_dir: Path, email: str) -> str:
    done = subprocess.run([str(MISTRAL_SERVE), "keys", "create", "--email", email, "--name", "heavy-schema",
                           "--data-dir", str(data_dir)], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# report

def format_report(report: dict) -> str:
    lines = []
    costs = report.get("compile_costs")
    if costs:
        lines += [f"one {costs['num_properties']}-property schema (grammar {costs['grammar_mb']:.1f} MB):",
                  f"  compiled in process            {1000 * costs['in_process_s']:8.1f} ms",
                  f"  through a warm grammar worker  {1000 * costs['worker_s']:8.1f} ms  (compiled again here)",
                  f"  carried over from the worker   {1000 * costs['worker_carried_s']:8.1f} ms  "
                  f"(serialise {1000 * costs['serialize_s']:.0f} ms, {costs['serialized_mb']:.1f} MB of JSON, "
                  f"read back {1000 * costs['deserialize_s']:.0f} ms)", ""]
    rows = [("victim", "ok", "median ms", "p90 ms", "max ms")]
    for name in ("alone", "under_attack"):
        phase = report[name]
        rows.append((name.replace("_", " "), str(phase["num_ok"]),
                     *(f"{1000 * phase[key]:.0f}" if phase[key] is not None else "-"
                       for key in ("median_s", "p90_s", "max_s"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in
                        enumerate(zip(row, widths))) for row in rows]
    alone, attacked = report["alone"], report["under_attack"]
    if alone["median_s"] and attacked["median_s"]:
        lines.append(f"ratio under attack / alone: median {attacked['median_s'] / alone['median_s']:.2f}x, "
                     f"p90 {attacked['p90_s'] / alone['p90_s']:.2f}x")
    attackers = report["attackers"]
    outcomes = ", ".join(f"{status}: {count}" for status, count in sorted(attackers["statuses"].items()))
    lines.append(f"attackers: {attackers['num_accounts']} accounts, {sum(attackers['statuses'].values())} requests "
                 f"in {attackers['seconds']:.0f} s ({outcomes})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attackers", type=int, default=6, help="accounts sending heavy schemas (default 6)")
    parser.add_argument("--properties", type=int, default=200, help="properties per schema (default 200)")
    parser.add_argument("--same-schema", action="store_true",
                        help="each attacker repeats one schema (compiled once) instead of a new one per request")
    parser.add_argument("--requests", type=int, default=40, help="victim requests per phase (default 40)")
    parser.add_argument("--blocks", type=int, default=4,
                        help="each phase in this many blocks, alone and under attack in turn (default 4)")
    parser.add_argument("--max-tokens", type=int, default=8, help="per request, victim and attackers (default 8)")
    parser.add_argument("--attack-warmup", type=float, default=2.0,
                        help="seconds of attack before each of the victim's blocks under attack (default 2)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after each block under attack before the next block alone (default 5): "
                             "the attackers hang up, and the grammar workers killed with their compilations "
                             "are replaced in the background")
    parser.add_argument("--threads", type=int, help="the server's engine threads (default: every core here)")
    parser.add_argument("--skip-compile-costs", action="store_true", help="do not measure compile costs here")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "heavy_schema.json", help="JSON report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report: dict = {"benchmark": "heavy_schema", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "load_average_start": machine_load(),
                    "args": {name: value for name, value in vars(args).items() if name != "output"}}
    if not args.skip_compile_costs:
        report["compile_costs"] = compile_costs(args.properties)
    with tempfile.TemporaryDirectory(prefix="heavy-schema-") as work:
        work_dir = Path(work)
        data_dir = work_dir / "data"
        victim_key = create_key(data_dir, "victim@example.com")
        attacker_keys = [create_key(data_dir, f"attacker{i}@example.com") for i in range(args.attackers)]
        port, threads = free_port(), args.threads or len(os.sched_getaffinity(0))
        command = [str(MISTRAL_SERVE), "serve", "--model", "demo=demo", "--port", str(port),
                   "--data-dir", str(data_dir), "--threads", str(threads)]
        base_url = f"http://127.0.0.1:{port}/v1"
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with running("mistral-serve", Launch(command, "demo", ready_path="/ready"), port, threads,
                     args.output.with_suffix(".server.log")):
            model = httpx.get(f"{base_url}/models", timeout=30).json()["data"][0]["id"]
            report.update(asyncio.run(serving_phases(base_url, model, victim_key, attacker_keys, args)))
    report["load_average_end"] = machine_load()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
