"""The serving benchmark against the peers: the same load, on the same GGUF file, against each server.

Each server is started on loopback in turn, loaded by serve.py, and stopped, so they never share
the machine with each other; one table gives every server's numbers as multiples of the reference
(llama-cpp-python's server), and bench/results/serve.json and serve.png hold the rest.

  llama-cpp-python  its OpenAI server (`python -m llama_cpp.server`, --interrupt_requests False:
                    with the default, a new request cuts the running stream short)
  llama-server      llama.cpp's own server, with parallel slots (continuous batching)
  transformers      transformers' `generate` behind a minimal endpoint: one request at a time
  mistral-serve     ours, the GGUF dequantized to bfloat16 (float32 on CPUs without it)
  mistral-serve-int4  ours with `--quantize int4`: the GGUF's weights requantized to grouped int4

The peers are built by `make peers` into .venv-peers (llama-server only when its build succeeded);
a peer that is not there is skipped with a note. Every reply is made to run to --output-tokens:
llama-server, the transformers baseline and mistral-serve take `ignore_eos`, llama-cpp-python's
server `min_tokens`.

    python bench/peers.py                                 # demo model, concurrency 1 and 16
    python bench/peers.py --concurrency 1,4,16,64 --servers llama-server,mistral-serve
    python bench/peers.py --random-7b --concurrency 16    # mistral-serve only, 7B-shape int8: peak memory
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from serve import RESULTS_DIR, Target, Workload, add_workload_flags, make_report, run_server, workload_from, \
    write_report
from serve_report import format_table, machine_load

REPOSITORY = Path(__file__).resolve().parents[1]
PEERS_VENV = REPOSITORY / ".venv-peers"
LLAMA_SERVER = PEERS_VENV / "bin" / "llama-server"
MISTRAL_SERVE = Path(sys.executable).with_name("mistral-serve")
PEER_NAMES = ("llama-cpp-python", "llama-server", "transformers", "mistral-serve", "mistral-serve-int4")
# ggml's AMX matmul dies with SIGILL on its first request on CPUs with tile units (a tile
# instruction on a thread whose tiles it has not configured): there the llama.cpp peers run with
# their extra buffer types off, on ggml's AVX-512 kernels
_CPUINFO = Path("/proc/cpuinfo")
_CPU_HAS_TILE_UNITS = _CPUINFO.exists() and "amx_int8" in _CPUINFO.read_text().split()
_NO_AMX_NOTE = " (ggml's AMX kernels crash on this CPU: off)"
READY_TIMEOUT_S = 900  # the 7B random model takes minutes to build on a small machine


@dataclass(frozen=True)
class Setup:
    """What every launcher needs: the checkpoint, the threads, the workload, a folder for logs."""

    gguf: Path | None
    threads: int
    workload: Workload
    work_dir: Path


@dataclass(frozen=True)
class Launch:
    command: list[str]
    model: str  # the id requests ask for
    extra_body: dict = field(default_factory=dict)
    api_key: str | None = None
    ready_path: str = "/v1/models"
    note: str = ""
    env: dict = field(default_factory=dict)  # set in the server's environment, after ours is cleared of MISTRAL_SERVE_*


def launch_llama_cpp_python(setup: Setup, port: int) -> Launch | str:
    python = PEERS_VENV / "bin" / "python"
    found = subprocess.run([python, "-c", "import llama_cpp.server, llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True) if python.exists() else None
    if not found or found.returncode:
        return "not installed: run `make peers`"
    # on CPUs with tile units its AMX kernels crash (see llama_cpp_python_server.py): kept off there
    server = ([str(Path(__file__).with_name("llama_cpp_python_server.py"))] if _CPU_HAS_TILE_UNITS
              else ["-m", "llama_cpp.server"])
    return Launch([str(python), *server, "--model", str(setup.gguf), "--model_alias", "demo",
                   "--n_threads", str(setup.threads), "--n_threads_batch", str(setup.threads), "--n_ctx", "4096",
                   "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)],
                  "demo", {"min_tokens": setup.workload.output_tokens},
                  note=f"version {found.stdout.strip()}; requests are served one at a time; no usage in streams: "
                       f"tokens counted from chunks{_NO_AMX_NOTE if _CPU_HAS_TILE_UNITS else ''}")


def launch_llama_server(setup: Setup, port: int) -> Launch | str:
    if not LLAMA_SERVER.exists():
        return "not built: run `make peers` (llama-server is built when llama.cpp's CMake build succeeds)"
    slots = max((16, *setup.workload.concurrencies))
    context_per_slot = 2 * (setup.workload.prompt_tokens + setup.workload.output_tokens) + 128
    return Launch([str(LLAMA_SERVER), "-m", str(setup.gguf), "-t", str(setup.threads), "-np", str(slots),
                   "-c", str(slots * context_per_slot), "--host", "127.0.0.1", "--port", str(port),
                   *(["--no-repack"] if _CPU_HAS_TILE_UNITS else [])],
                  "demo", {"ignore_eos": True}, ready_path="/health",
                  note=f"{slots} parallel slots of {context_per_slot} tokens"
                       f"{'; --no-repack' + _NO_AMX_NOTE if _CPU_HAS_TILE_UNITS else ''}")


def launch_transformers(setup: Setup, port: int) -> Launch | str:
    return Launch([sys.executable, str(Path(__file__).with_name("transformers_server.py")), "--gguf", str(setup.gguf),
                   "--model", "demo", "--port", str(port), "--threads", str(setup.threads)],
                  "demo", {"ignore_eos": True}, note="one request at a time; weights dequantized to float32")


def launch_mistral_serve(setup: Setup, port: int, quantize: str | None = None) -> Launch | str:
    import torch

    from mistral_serve.model.precision import resolve_dtype

    data_dir = setup.work_dir / f"mistral-serve-{quantize or 'data'}"
    model = "smollm2-135m-instruct"
    dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")  # what the server picks
    weights = (f"the GGUF's weights requantized to {quantize} (`--quantize {quantize}`), {dtype} activations"
               if quantize else f"the GGUF dequantized to {dtype} (the default on this CPU)")
    return Launch([str(MISTRAL_SERVE), "serve", "--model", f"{model}={setup.gguf}", "--port", str(port),
                   "--data-dir", str(data_dir), "--threads", str(setup.threads),
                   *(["--quantize", quantize] if quantize else [])],
                  model, {"ignore_eos": True}, _create_key(data_dir), "/ready",
                  note=f"continuous batching; {weights}")


def launch_random_7b(setup: Setup, port: int) -> Launch | str:
    data_dir = setup.work_dir / "random-7b-data"
    return Launch([sys.executable, str(Path(__file__).with_name("random_model_server.py")), "--port", str(port),
                   "--data-dir", str(data_dir)], "mistralai/Mistral-7B-Instruct-v0.3", {"ignore_eos": True},
                  _create_key(data_dir), "/ready", note="Mistral-7B-v0.3 shape, random weights, int8")


LAUNCHERS: dict[str, Callable[[Setup, int], Launch | str]] = {
    "llama-cpp-python": launch_llama_cpp_python, "llama-server": launch_llama_server,
    "transformers": launch_transformers, "mistral-serve": launch_mistral_serve,
    "mistral-serve-int4": lambda setup, port: launch_mistral_serve(setup, port, quantize="int4"),
    "mistral-serve-7b-int8": launch_random_7b}


def _create_key(data_dir: Path) -> str:
    done = subprocess.run([str(MISTRAL_SERVE), "keys", "create", "--email", "bench@example.com", "--name", "bench",
                           "--data-dir", str(data_dir)], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


# one server at a time

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(name: str, launch: Launch, port: int, threads: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """The server, started and answering its ready path; stopped on exit."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("MISTRAL_SERVE_")}
    environ["OMP_NUM_THREADS"] = str(threads)  # torch's thread count, for the servers that take no flag for it
    environ.update(launch.env)
    with log_path.open("w") as log:
        process = subprocess.Popen(launch.command, stdout=log, stderr=subprocess.STDOUT, env=environ)
        try:
            _wait_until_ready(name, f"http://127.0.0.1:{port}{launch.ready_path}", process, log_path)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(name: str, url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} was not ready in {READY_TIMEOUT_S} s; see {log_path}")


def bench_peer(name: str, setup: Setup) -> tuple[dict | None, str]:
    """The peer's results (None when it could not run), and a note on how it ran or why not."""
    port = _free_port()
    launch = LAUNCHERS[name](setup, port)
    if isinstance(launch, str):
        return None, launch
    print(f"{name}: starting ({' '.join(launch.command[:3])} …)", flush=True)
    started = time.monotonic()
    try:
        with running(name, launch, port, setup.threads, setup.work_dir / f"{name}.log") as process:
            print(f"{name}: ready in {time.monotonic() - started:.0f} s", flush=True)
            target = Target(name, f"http://127.0.0.1:{port}/v1", launch.model, launch.api_key, launch.extra_body,
                            process.pid)
            return run_server(target, setup.workload, log=lambda line: print(line, flush=True)), launch.note
    except RuntimeError as error:
        return None, f"failed: {error}"


# command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(PEER_NAMES), help="comma-separated, of: %(default)s")
    parser.add_argument("--gguf", type=Path, help="the GGUF file every server loads (default: the demo model)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for the peers that take a count (default: the cores this process may use)")
    parser.add_argument("--reference", default="llama-cpp-python", help="the server the ratios are against")
    parser.add_argument("--random-7b", action="store_true",
                        help="serve only mistral-serve, on a random-weight int8 model of Mistral-7B's shape, and "
                             "report its peak resident memory (slow: keep --output-tokens small)")
    add_workload_flags(parser, Workload(concurrencies=(1, 16)))
    parser.add_argument("--output", type=Path, help="JSON report (default: bench/results/serve.json, or "
                                                    "serve-7b-int8.json with --random-7b)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (their folder is printed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a plain kill must stop the server being measured too: exit through the `finally` that stops it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.random_7b and "--output-tokens" not in (argv if argv is not None else sys.argv):
        args.output_tokens = 16  # a 7B step takes about a second here: keep the default run within minutes
    workload = workload_from(args)
    names = ["mistral-serve-7b-int8"] if args.random_7b else [n.strip() for n in args.servers.split(",")]
    unknown = set(names) - set(LAUNCHERS)
    if unknown:
        raise SystemExit(f"unknown servers: {', '.join(sorted(unknown))} (known: {', '.join(PEER_NAMES)})")
    gguf = None
    if not args.random_7b:
        from mistral_serve.model.checkpoints.loader import find_demo_gguf
        gguf = (args.gguf or find_demo_gguf()).resolve()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    setup = Setup(gguf, args.threads, workload, work_dir)
    load_before = machine_load()
    servers, notes = [], {}
    for name in names:
        result, notes[name] = bench_peer(name, setup)
        print(f"{name}: {notes[name]}", flush=True)
        if result:
            servers.append({**result, "note": notes[name]})
    output = args.output or RESULTS_DIR / ("serve-7b-int8.json" if args.random_7b else "serve.json")
    report = make_report(servers, workload, load_before, {"gguf": gguf.name if gguf else None,
                                                           "threads": args.threads, "servers": notes})
    write_report(report, output, output.with_suffix(".png") if servers else None)
    print(format_table(report, reference=args.reference))
    for name, note in notes.items():
        print(f"{name}: {note}")
    print(f"wrote {output}" + (f" and {output.with_suffix('.png')}" if servers else ""))
    if args.keep_logs:
        print(f"server logs: {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if servers else 1


if __name__ == "__main__":
    sys.exit(main())
