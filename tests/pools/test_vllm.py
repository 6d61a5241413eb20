"""Opt-in (`pytest -m vllm`, after `scripts/vllm-upstream.sh`): two vLLM CPU servers as the upstreams
of a gateway's pool, serving the demo model converted for vLLM. The gateway keeps its keys, limits
and metering in front of an engine that is not ours: answers, streams, JSON schemas, usage counted
alike, a client that leaves, and a server killed mid-stream.

vLLM's own `vllm serve` fails in the CPU package (it asks for the version of a distribution named
"vllm"), so the servers run its entry module with the same flags, as the script prints."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
import json
import os
from pathlib import Path
import signal
import subprocess
import time

import httpx
import jsonschema
import pytest

from mistral_serve.catalog import DEMO_MODEL_ID
from tests.api.conftest import bearer, sse_events
from tests.api.servers import _free_port, mistral_serve, wait_until_ready
from tests.pools.cluster import (
    ENGINE_TOKEN, HEALTH_INTERVAL_S, TOKEN_VARIABLE, events_of, running_on, usage_row,
)

pytestmark = pytest.mark.vllm

VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"
CHECKPOINT = VENV / "demo-hf"
SERVED_NAME = "smollm2"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@dataclass
class VLLMServer:
    port: int
    core: int  # the CPU its model runs on
    log: Path
    process: subprocess.Popen | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        environ = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(self.core)}
        self.process = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model",
             str(CHECKPOINT), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
             "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager", "--api-key", ENGINE_TOKEN],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=environ, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to the server and the engine process it started."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def metric(self, name: str) -> float:
        text = httpx.get(self.origin + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.fixture(scope="module")
def vllm_servers(tmp_path_factory):
    if not (CHECKPOINT / "config.json").is_file():
        pytest.skip("vLLM's CPU build is not set up: run scripts/vllm-upstream.sh first")
    work = tmp_path_factory.mktemp("vllm")
    servers = [VLLMServer(_free_port(), core, work / f"vllm{core}.log") for core in (0, 1)]
    with ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        for server in servers:  # started together: about a minute on two busy cores
            wait_until_ready(server.origin, server.process, server.log, path="/health")
        yield servers


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, vllm_servers):
    work = tmp_path_factory.mktemp("vllm-gateway")
    pools = work / "pools.yaml"  # JSON is YAML
    pools.write_text(json.dumps({"models": [{"id": DEMO_MODEL_ID, "health_interval_s": HEALTH_INTERVAL_S, "upstreams": [
        {"url": server.origin + "/v1", "model": SERVED_NAME, "name": f"vllm{server.core}", "token_env": TOKEN_VARIABLE}
        for server in vllm_servers]}]}))
    with mistral_serve(work, "--pools-file", str(pools)) as server:
        yield server


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """Our own engine on the same model in float32: the reference for what the model says."""
    with mistral_serve(tmp_path_factory.mktemp("demo-f32"), "--model", f"{DEMO_MODEL_ID}=demo", "--dtype", "float32",
                       "--max-model-len", "2048") as server:
        yield server


def post(server, **fields) -> httpx.Response:
    body = {"model": DEMO_MODEL_ID, "messages": MESSAGES, **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=bearer(server.key), timeout=300)


def test_vllm_upstreams_answer_through_the_gateway_metered_as_we_count(gateway, in_process):
    pooled, ours = post(gateway, temperature=0, max_tokens=8), post(in_process, temperature=0, max_tokens=8)
    assert pooled.status_code == ours.status_code == 200, pooled.text
    assert pooled.json()["model"] == DEMO_MODEL_ID and pooled.json()["id"] == pooled.headers["x-request-id"]
    # the prompt is the same tokens to vLLM and to us; float32 greedy decoding says the same words
    assert pooled.json()["usage"]["prompt_tokens"] == ours.json()["usage"]["prompt_tokens"]
    assert pooled.json()["choices"][0]["message"]["content"] == ours.json()["choices"][0]["message"]["content"]

    streamed = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer(gateway.key), timeout=300, json={
        "model": DEMO_MODEL_ID, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, "stream": True})
    *chunks, done = sse_events(streamed.text)
    assert done == "[DONE]" and all("usage" not in chunk for chunk in chunks)  # not asked for: dropped
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
    assert text == pooled.json()["choices"][0]["message"]["content"]


def test_a_json_schema_holds_through_a_vllm_upstream(gateway):
    reply = post(gateway, seed=1, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]), PERSON)


@contextmanager
def long_stream(gateway, **stream_options):
    body = {"model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 1500, "min_tokens": 1500, "temperature": 1.0, "stream": True, **stream_options}
    with httpx.Client(timeout=300) as client:
        with client.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                           headers=bearer(gateway.key)) as response:
            yield response


def test_a_client_that_leaves_stops_the_vllm_request(gateway, vllm_servers):
    with long_stream(gateway) as response:
        lines = response.iter_lines()
        for line in lines:
            if '"content": "' in line and '"role"' not in line:
                break
        server = running_on(vllm_servers, timeout_s=30)
    left_at = time.monotonic()
    while server.metric("vllm:num_requests_running") > 0:
        assert time.monotonic() - left_at < 10, "vLLM still runs the request of a client that left"
        time.sleep(0.05)
    print(f"vLLM stopped the request {time.monotonic() - left_at:.2f} s after the client left")


def test_a_vllm_server_killed_mid_stream(gateway, vllm_servers):
    with long_stream(gateway, stream_options={"include_usage": True, "continuous_usage_stats": True}) as response:
        lines = response.iter_lines()
        received = []
        while len(received) < 6:
            received += events_of([next(lines)])
        victim = running_on(vllm_servers, timeout_s=30)
        victim.kill()
        received += events_of(lines)
    assert received[-1] == "[DONE]"
    *chunks, error = [json.loads(event) for event in received[:-1]]
    assert error["error"]["code"] == "upstream_failed"
    delivered = chunks[-1]["usage"]["completion_tokens"]
    database = Path(gateway.process.args[gateway.process.args.index("--data-dir") + 1]) / "mistral-serve.db"
    row = usage_row(database, chunks[0]["id"])
    assert (row["completion_tokens"], row["finish_reason"]) == (delivered, "cut")
    for index in range(20):  # the other server takes everything now
        assert post(gateway, max_tokens=2, messages=[{"role": "user", "content": f"Hi {index}"}]).status_code == 200
    victim.start()  # back, for whatever runs after
