"""The SGLang Model Gateway (`smg`, the test extra's smg==1.13.0) as a router in front of our engines, for
the upstream-pool tests: `smg_router()` starts it on free loopback ports and stops it again.

What smg 1.13.0 does with HTTP workers, as run against fake engines (tests/upstream/test_smg.py checks
the parts the fixture relies on):

- Startup: `smg launch --host H --port P --worker-urls URL... --policy POLICY`. It answers at once and
  registers the workers in the background; `GET /readiness` is 200 as soon as ONE worker is healthy
  (`{"status": "ready", "healthy_workers": n, "total_workers": m}`), so waiting for a whole pool means
  waiting for `healthy_workers` to reach the pool's size (well under a second on loopback).
- Registration asks each worker `GET /health` (with no Authorization header at first: it must answer
  without one), then `GET /v1/models` (it must list the model: the first entry's `id` is the name
  clients must send as `model`; an `owned_by` smg does not know registers the worker as a "generic"
  OpenAI-compatible one), and probes `/version`, `/server_info`, `/get_server_info`, `/model_info`,
  `/get_model_info`, `/loads` and `/v1/loads`, where a 404 is fine. A worker whose `/health` or
  `/v1/models` fails stays out and is asked again later (one not listening yet, every
  `--worker-startup-check-interval`: 30 s by default, 1 s here). Afterwards `GET /health` every
  `--health-check-interval-secs` (60 by default): 3 failures in a row take a worker out of routing,
  2 successes bring it back.
- Tokens: `--api-key T` makes smg demand `Authorization: Bearer T` of its clients (401 otherwise;
  `/health`, `/readiness` and `/v1/models` stay open) and send `Bearer T` on its own probes. On
  forwarded requests the client's Authorization header goes to the worker verbatim (it wins over the
  key), with `x-request-id`, `x-correlation-id`, `traceparent` and `tracestate`; other headers stay
  behind. Workers that require a token therefore need `--api-key` set to that token, and so do the
  clients.
- Chat completions: smg parses the body and rejects what its own schema refuses (400: an empty
  `messages`, `temperature` above 2, more than 4 `stop` strings, `top_logprobs` without `logprobs`,
  no `model`; 404 for a model no worker lists), and forwards the rest re-serialised: fields it does
  not know (`stream_options.continuous_usage_stats`, `top_k`, ...) go through, `model` is not
  rewritten, and defaults are added (`"stream": false`, `"logprobs": false`, and `"tool_choice":
  "auto"` when there are tools). A worker's reply, streamed or not, comes back byte for byte (its
  headers gain `x-smg-routed-worker-id`, the worker's URL, and `x-request-id`); a stream
  silent for `--sse-keepalive-secs` (15) gets `: ping` comment lines.
- Failures: a request a worker refuses to connect is retried on another (`--retry-max-retries`, 5 by
  default; `--disable-retries`); with every worker down the client gets 500
  (`call_upstream_connection_failed`), then 503 (`no_available_workers`) once health checks have
  caught up. A worker that dies mid-stream leaves the client an HTTP 200 stream ending in
  `data: {"error": {..., "type": "stream_error"}}` and `data: [DONE]`. A client that disconnects
  mid-stream has its worker connection closed (the worker sees the disconnect).
- Routing: `cache_aware` keeps requests whose text shares a prefix with earlier ones on the same worker;
  for chat the text is the messages' contents joined by spaces (no roles, no template).
- Both listeners (the API's and a Prometheus one, 0.0.0.0:29000 unless told) must bind or smg exits.
  SIGTERM waits up to `--shutdown-grace-period-secs` (180) for requests in flight; an idle smg exits
  within a few seconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, ExitStack
import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from tests.services import ServiceFailed, ServiceUnavailable, free_port, stop_process

READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20
BIND_ATTEMPTS = 3  # the free ports are picked before smg binds them: another process may take one first
SHUTDOWN_GRACE_S = 1  # in-flight requests smg waits for on SIGTERM (180 by default)
STARTUP_CHECK_INTERVAL_S = 1  # how soon smg asks again of a worker not up yet (30 s by default)
POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # smg colours its log even in a file


def smg_executable() -> str | None:
    """The `smg` command installed next to the running Python (its virtual environment's bin folder), or
    else on PATH; None where smg is not installed."""
    beside = Path(sys.executable).parent / "smg"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("smg")


@contextmanager
def smg_router(worker_urls: list[str], *, policy: str = "cache_aware", worker_token: str | None = None,
               log_path: str | os.PathLike | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
               extra_args: Sequence[str] = ()) -> Iterator[str]:
    """smg on a free loopback port in front of `worker_urls`; yields its OpenAI base URL (".../v1"); stops
    it (SIGTERM, then SIGKILL) on exit; raises with its log's tail if it does not become ready within
    `ready_timeout_s` (every worker registered and healthy).

    `worker_token`: the Bearer token the workers require. smg sends it on its own probes and then
    demands it of its clients too, whose Authorization header it forwards as is. `log_path`: where smg
    logs (a temporary file, removed afterwards, by default). `extra_args`: more `smg launch` options."""
    executable = smg_executable()
    if executable is None:
        raise ServiceUnavailable("smg is not installed (the test extra's smg==1.13.0)")
    if not worker_urls:
        raise ValueError("smg needs at least one worker URL")
    if policy not in POLICIES:
        raise ValueError(f"unknown smg policy {policy!r}: one of {', '.join(POLICIES)}")
    with ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smg-"))) / "smg.log"
        log_path = Path(log_path)
        for attempt in range(1, BIND_ATTEMPTS + 1):
            log_start = log_path.stat().st_size if log_path.exists() else 0
            port, metrics_port = _two_free_ports()
            command = [executable, "launch", "--host", "127.0.0.1", "--port", str(port),
                       "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
                       "--worker-urls", *worker_urls, "--policy", policy, "--log-level", "info",
                       "--shutdown-grace-period-secs", str(SHUTDOWN_GRACE_S),
                       "--worker-startup-check-interval", str(STARTUP_CHECK_INTERVAL_S), *extra_args]
            if worker_token is not None:
                command += ["--api-key", worker_token]
            with open(log_path, "ab") as log:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=_environment())
            stack.callback(stop_process, process, timeout_s=STOP_TIMEOUT_S)
            base = f"http://127.0.0.1:{port}"
            if _wait_until_ready(process, base, len(set(worker_urls)), ready_timeout_s):
                yield base + "/v1"
                return
            tail = _tail(log_path, start=log_start)  # before its shutdown's lines push the cause out
            has_exited = process.poll() is not None
            stop_process(process, timeout_s=STOP_TIMEOUT_S)
            if not has_exited or "Address already in use" not in tail or attempt == BIND_ATTEMPTS:
                raise ServiceFailed(f"smg did not become ready in front of {worker_urls} within "
                                    f"{ready_timeout_s} s (log: {log_path}):\n{tail}")


def _two_free_ports() -> tuple[int, int]:
    port = free_port()
    while (metrics_port := free_port()) == port:
        pass
    return port, metrics_port


def _environment() -> dict[str, str]:
    """The tests' environment, with loopback kept off any HTTP proxy that it names (smg's HTTP client
    follows the proxy variables)."""
    environment = dict(os.environ)
    for name in ("NO_PROXY", "no_proxy"):
        environment[name] = ",".join(filter(None, [environment.get(name), "127.0.0.1", "localhost", "::1"]))
    return environment


def _wait_until_ready(process: subprocess.Popen, base: str, num_workers: int, timeout_s: float) -> bool:
    """Whether smg answers /readiness with every worker healthy before `timeout_s` (False when it exits)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never through a proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with opener.open(base + "/readiness", timeout=2) as response:
                if json.load(response).get("healthy_workers", 0) >= num_workers:
                    return True
        except (OSError, ValueError):  # not listening yet, 503 (urllib's HTTPError), or not JSON
            pass
        time.sleep(0.05)
    return False


def _tail(log: Path, num_lines: int = 30, start: int = 0) -> str:
    """The last lines smg wrote to `log` from byte `start` on."""
    try:
        with open(log, "rb") as file:
            file.seek(start)
            text = file.read().decode(errors="replace")
        return "\n".join(_ANSI.sub("", text).splitlines()[-num_lines:])
    except OSError:
        return "(no log)"
