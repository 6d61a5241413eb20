"""Engine-level decode benchmark: LLMEngine.step() in a loop, no HTTP.

For each model setting it measures, after a short warm-up, one stream and N concurrent streams
(all added at once, random-token prompts, greedy, a fixed output length with ignore_eos): time to
first token and prefill tokens/s, decode tokens/s, the memory bandwidth that decode achieves
(weight bytes read per engine step × steps per second) next to the read bandwidth this machine
measures in the same run, and the peak resident memory. See bench/README.md.

    python bench/engine_bench.py [--models demo,demo-bf16,7b-bf16,7b-int8] [--output-tokens N] ...
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
import ctypes
import gc
import itertools
import json
import os
from pathlib import Path
import platform
import random
import shlex
import statistics
import sys
import threading
import time

import psutil
import torch

from mistral_serve.engine.builder import available_cores, prepare_model
from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.engine.params import SamplingParams
from engine_models import SETTINGS, ModelSetting, bytes_read_per_step, weight_bytes

DEFAULT_MODELS = "demo,demo-bf16,7b-bf16,7b-int8"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "engine.json"
GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated settings, from: {', '.join(SETTINGS)} (default: %(default)s)")
    parser.add_argument("--output-tokens", type=int, default=None,
                        help="tokens generated per stream (default: per model, "
                             + ", ".join(f"{s.name} {s.default_output_tokens}" for s in SETTINGS.values()) + ")")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length, random token ids")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams of the batched scenario")
    parser.add_argument("--warmup-tokens", type=int, default=2, help="tokens of the one-stream warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                        help="engine token budget per step (default: the engine's, %(default)s)")
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache size, MiB")
    parser.add_argument("--bandwidth-gb", type=float, default=2.0, help="size of the bandwidth probe tensor, GB")
    parser.add_argument("--bandwidth-repeats", type=int, default=5, help="timed sums over it; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown model setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    for name in ("output_tokens", "prompt_tokens", "streams", "warmup_tokens", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# the machine

def machine_info(num_threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": available_cores(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_bytes": psutil.virtual_memory().total, "torch": torch.__version__,
            "threads": num_threads, "python": platform.python_version()}


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: other work on a shared machine skews every number here."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def measure_read_bandwidth(num_bytes: int, repeats: int) -> dict:
    """Best of `repeats` timed `torch.sum`s over one float32 tensor of `num_bytes`, all threads."""
    probe = torch.ones(num_bytes // 4, dtype=torch.float32)
    probe.sum()  # first touch and warm-up, untimed
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        probe.sum()
        seconds.append(time.perf_counter() - start)
    del probe
    return {"bytes": num_bytes, "repeats": repeats, "best_bytes_per_s": num_bytes / min(seconds),
            "median_bytes_per_s": num_bytes / statistics.median(seconds)}


class PeakRss:
    """Samples this process's resident memory every `interval` seconds in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self._stop.wait(self.interval):
                return


def free_memory() -> None:
    """Collect garbage and hand freed heap pages back, so the next model's RSS starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may keep some freed memory
        pass


# one scenario

@dataclass
class ScenarioResult:
    num_streams: int
    prompt_tokens: int
    output_tokens: int  # per stream
    num_steps: int
    total_s: float
    ttft_s: list[float]  # per stream, from the moment all requests were added
    prefill_tokens_per_s: float  # all prompt tokens / time until the last stream had its first token
    num_decode_steps: int  # steps after every stream had its first token
    decode_s: float
    decode_tokens_per_s: float | None  # tokens of those steps / their time; None with one output token
    decode_steps_per_s: float | None
    median_step_tokens_per_s: float | None  # the median over decode steps of tokens / duration: robust to stalls
    decode_step_s: list[float]  # each decode step's duration
    achieved_bytes_per_s: float | None  # weight bytes read per step × decode steps per second
    peak_rss_bytes: int


_request_ids = itertools.count()


def run_scenario(engine: LLMEngine, num_streams: int, prompt_tokens: int, output_tokens: int,
                 rng: random.Random, read_bytes: int) -> ScenarioResult:
    vocab_size = engine.model.config.vocab_size
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    prompts = [[rng.randrange(vocab_size) for _ in range(prompt_tokens)] for _ in range(num_streams)]
    first_token_at: dict[str, float] = {}
    num_tokens: dict[str, int] = {}
    steps: list[tuple[float, int]] = []  # (end time, tokens out)
    with PeakRss() as rss:
        start = time.perf_counter()
        for prompt in prompts:
            engine.add_request(f"bench-{next(_request_ids)}", prompt, params)
        while engine.has_unfinished_requests():
            deltas = engine.step()
            now = time.perf_counter() - start
            steps.append((now, sum(len(delta.token_ids) for delta in deltas)))
            for delta in deltas:
                if delta.token_ids:
                    first_token_at.setdefault(delta.request_id, now)
                num_tokens[delta.request_id] = delta.num_output_tokens
                if delta.finish_reason not in (None, "length"):
                    raise RuntimeError(f"{delta.request_id} finished with {delta.finish_reason!r}, "
                                       "expected 'length' (ignore_eos is set)")
    if sorted(num_tokens.values()) != [output_tokens] * num_streams:
        raise RuntimeError(f"expected {output_tokens} tokens from each of {num_streams} streams, "
                           f"got {sorted(num_tokens.values())}")
    # decode: the steps after every stream has its first token
    prefill_end = max(first_token_at.values())
    decode = [(end, count) for end, count in steps if end > prefill_end]
    decode_s = decode[-1][0] - prefill_end if decode else 0.0
    steps_per_s = len(decode) / decode_s if decode else None
    ends = [prefill_end] + [end for end, _ in decode]
    step_s = [later - earlier for earlier, later in itertools.pairwise(ends)]
    return ScenarioResult(
        num_streams=num_streams, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        num_steps=len(steps), total_s=steps[-1][0], ttft_s=sorted(first_token_at.values()),
        prefill_tokens_per_s=num_streams * prompt_tokens / prefill_end,
        num_decode_steps=len(decode), decode_s=decode_s,
        decode_tokens_per_s=sum(count for _, count in decode) / decode_s if decode else None,
        decode_steps_per_s=steps_per_s,
        median_step_tokens_per_s=(statistics.median(count / seconds for (_, count), seconds in zip(decode, step_s))
                                  if decode else None),
        decode_step_s=step_s,
        achieved_bytes_per_s=read_bytes * steps_per_s if decode else None,
        peak_rss_bytes=rss.peak)


# one model setting

def bench_model(setting: ModelSetting, args: argparse.Namespace, rng: random.Random) -> dict:
    free_memory()
    rss_before = psutil.Process().memory_info().rss
    print(f"[{setting.name}] loading: {setting.description}", file=sys.stderr, flush=True)
    with PeakRss() as load_rss:
        start = time.perf_counter()
        model, tokenizer = setting.load()
        load_s = time.perf_counter() - start
    config = EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_memory=args.kv_cache_mb << 20, seed=args.seed)
    read_bytes, total_bytes = bytes_read_per_step(model), weight_bytes(model)  # before preparing packs weights
    engine = LLMEngine(prepare_model(model), tokenizer, config)
    output_tokens = args.output_tokens or setting.default_output_tokens
    result = {
        "model": setting.name, "description": setting.description,
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "weight_bytes": total_bytes, "read_bytes_per_step": read_bytes,
        "kv_cache_bytes": sum(k.nbytes + v.nbytes for k, v in engine.runner.kv_caches),
        "load_s": load_s, "rss_before_load_bytes": rss_before, "load_peak_rss_bytes": load_rss.peak,
    }
    print(f"[{setting.name}] loaded in {load_s:.1f} s; warming up", file=sys.stderr, flush=True)
    run_scenario(engine, 1, args.prompt_tokens, args.warmup_tokens, rng, read_bytes)
    scenarios = []
    for num_streams in (1, args.streams):
        print(f"[{setting.name}] {num_streams} stream(s) × {output_tokens} tokens", file=sys.stderr, flush=True)
        scenarios.append(run_scenario(engine, num_streams, args.prompt_tokens, output_tokens, rng, read_bytes))
    result["scenarios"] = [asdict(scenario) for scenario in scenarios]
    del engine, model, tokenizer
    free_memory()
    return result


# the report

def render(report: dict) -> str:
    machine, bandwidth = report["machine"], report["read_bandwidth"]
    measured = bandwidth["best_bytes_per_s"]
    lines = [
        f"command: {report['command']}",
        (f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_bytes'] / GB:.1f} GB RAM, "
         f"torch {machine['torch']}, {machine['threads']} threads"),
        (f"load average (1/5/15 min) at start {_loads(report['load_average']['start'])}, "
         f"at end {_loads(report['load_average']['end'])}"),
        (f"measured read bandwidth: {measured / GB:.1f} GB/s (best of {bandwidth['repeats']} torch.sum over "
         f"{bandwidth['bytes'] / GB:.1f} GB; median {bandwidth['median_bytes_per_s'] / GB:.1f} GB/s)"),
        "",
        ("| model | streams | prompt+output tok | TTFT p50 / max s | prefill tok/s | decode tok/s | at median step "
         "| steps/s | weights read/step GB | achieved GB/s | measured GB/s | % of measured | weights GB | peak RSS GB |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in report["models"]:
        for s in model["scenarios"]:
            achieved = s["achieved_bytes_per_s"]
            lines.append(
                f"| {model['model']} | {s['num_streams']} | {s['prompt_tokens']}+{s['output_tokens']} "
                f"| {statistics.median(s['ttft_s']):.2f} / {max(s['ttft_s']):.2f} | {s['prefill_tokens_per_s']:.1f} "
                f"| {_number(s['decode_tokens_per_s'])} | {_number(s['median_step_tokens_per_s'])} "
                f"| {_number(s['decode_steps_per_s'], 2)} "
                f"| {model['read_bytes_per_step'] / GB:.2f} | {_number(achieved and achieved / GB)} "
                f"| {measured / GB:.1f} | {_number(achieved and 100 * achieved / measured, 0)} "
                f"| {model['weight_bytes'] / GB:.2f} | {s['peak_rss_bytes'] / GB:.2f} |")
    lines.append("")
    for model in report["models"]:
        lines.append(f"{model['model']}: {model['description']}; {model['dtype']} activations and KV cache "
                     f"({model['kv_cache_bytes'] / GB:.2f} GB); loaded in {model['load_s']:.1f} s, "
                     f"peak RSS while loading {model['load_peak_rss_bytes'] / GB:.2f} GB")
    return "\n".join(lines)


def _loads(values: list[float] | None) -> str:
    return "unknown" if values is None else " / ".join(f"{v:.2f}" for v in values)


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    num_threads = args.threads or available_cores()
    torch.set_num_threads(num_threads)
    report = {"command": "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]),
              "machine": machine_info(num_threads), "load_average": {"start": _load_average()}}
    print("measuring read bandwidth", file=sys.stderr, flush=True)
    report["read_bandwidth"] = measure_read_bandwidth(int(args.bandwidth_gb * GB), args.bandwidth_repeats)
    rng = random.Random(args.seed)
    report["models"] = [bench_model(SETTINGS[name], args, rng) for name in args.models]
    report["load_average"]["end"] = _load_average()
    print(render(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.output}")


if __name__ == "__main__":
    main()
