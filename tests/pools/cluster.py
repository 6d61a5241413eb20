"""Real `mistral-serve engine` processes, as an operator starts them on each engine machine, for the
pool tests: each on its own loopback port, with the shared token, until stopped (or killed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
import os
from pathlib import Path
import re
import shutil
import signal
import sqlite3
import subprocess
import time

import httpx

from tests.api.servers import (
    CLI, V3_MODEL_ID, V3_TOKENIZER, V3_VOCAB_SIZE, _environment, _free_port, wait_until_ready,
)
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint
from tests.services import stop_process

ENGINE_TOKEN = "engine-shared-token-for-tests"
ENGINE_ARGS = ("--kv-cache-memory-mb", "64", "--threads", "1")
HEALTH_INTERVAL_S = 1.0  # the pools' active checks in these tests


LONG_CONTEXT = 4096


def write_long_v3_checkpoint(directory: Path) -> Path:
    """A random v0.3-shaped Mistral, wider than the tiny one and with a 4096-token context: a reply of
    thousands of tokens runs for seconds, long enough to cut it or leave it in the middle."""
    path, _ = write_hf_checkpoint(directory, tiny_mistral_config(
        vocab_size=V3_VOCAB_SIZE, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=LONG_CONTEXT))
    shutil.copyfile(V3_TOKENIZER, path / "tokenizer.model.v3")
    return path


@dataclass
class Engine:
    """One engine process; `restart()` brings it back on the same port, as a supervisor would."""

    work_dir: Path
    checkpoint: Path
    port: int
    name: str
    process: subprocess.Popen | None = None
    num_starts: int = field(default=0)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def start(self) -> None:
        self.num_starts += 1
        log = (self.work_dir / f"{self.name}-{self.num_starts}.log").open("w")
        environ = _environment(self.work_dir / "empty-hf-cache", {"ENGINE_TOKEN": ENGINE_TOKEN})
        self.process = subprocess.Popen(
            [CLI, "engine", "--model", f"{V3_MODEL_ID}={self.checkpoint}", "--port", str(self.port), *ENGINE_ARGS],
            stdout=log, stderr=subprocess.STDOUT, env=environ)
        wait_until_ready(self.origin, self.process, Path(log.name), path="/health")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye; its connections simply drop."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=30)

    def metric(self, name: str) -> float:
        """One metric of its /metrics (summed over labels)."""
        text = httpx.get(self.origin + "/metrics", timeout=10).text
        assert re.search(rf"^# TYPE {re.escape(name.removesuffix('_total'))}(_total)? ", text, re.M), \
            f"{name} is not in the engine's metrics"
        return sum(float(match[1]) for match in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@contextmanager
def engines(work_dir: Path, checkpoint: Path, count: int) -> Iterator[list[Engine]]:
    """`count` engines serving `checkpoint` as the v0.3 model, started one after the other."""
    (work_dir / "empty-hf-cache").mkdir(parents=True, exist_ok=True)
    started = [Engine(work_dir, checkpoint, _free_port(), f"engine{index}") for index in range(count)]
    with ExitStack() as stack:
        for engine in started:
            stack.callback(engine.stop)
            engine.start()
        yield started


TOKEN_VARIABLE = "POOL_TESTS_ENGINE_TOKEN"  # where the gateway reads the engines' token from
os.environ[TOKEN_VARIABLE] = ENGINE_TOKEN  # the gateway processes inherit it


def upstream_flags(started: list[Engine], model_id: str = V3_MODEL_ID) -> list[str]:
    """The gateway's flags for a pool of `started`."""
    flags = []
    for engine in started:
        flags += ["--upstream", f"{model_id}={engine.base_url},name={engine.name}"]
    return [*flags, "--upstream-token-env", TOKEN_VARIABLE]


def pools_file(path: Path, started: list[Engine], model_id: str = V3_MODEL_ID, **options) -> Path:
    """A pools file (YAML) of `started`, health-checked every HEALTH_INTERVAL_S, with `options`."""
    import yaml

    pool = {"id": model_id, "health_interval_s": HEALTH_INTERVAL_S, **options,
            "upstreams": [{"url": engine.base_url, "name": engine.name, "token_env": TOKEN_VARIABLE}
                          for engine in started]}
    path.write_text(yaml.safe_dump({"models": [pool]}))
    return path


def events_of(lines) -> list[str]:
    """The data of each Server-Sent Event among `lines`."""
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def running_on(servers, timeout_s: float):
    """The one server (anything with `metric()`) that has a request running: the one a stream went to."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [server for server in servers if server.metric("vllm:num_requests_running") > 0]
        if len(busy) == 1:
            return busy[0]
        time.sleep(0.05)
    raise AssertionError("no single server runs the stream")


def usage_row(database: Path, request_id: str) -> dict:
    """The gateway's usage row of a request, once its writer has written it (20 s at most)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as connection:
            connection.row_factory = sqlite3.Row
            row = connection.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None:
            return dict(row)
        time.sleep(0.2)
    raise AssertionError(f"no usage row for {request_id}")
