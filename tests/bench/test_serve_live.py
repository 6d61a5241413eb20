"""The serving benchmark (bench/serve.py) against a real `mistral-serve serve` of the tiny random v0.3 checkpoint."""

import json
import subprocess
import sys

import pytest

from tests.api.servers import V3_MODEL_ID, mistral_serve, write_tiny_v3_checkpoint
from tests.bench.conftest import BENCH_DIR

BENCH = [sys.executable, str(BENCH_DIR / "serve.py")]

V3_EOS_ID = 2  # banned, so that every random reply runs to the tokens asked for


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    checkpoint = write_tiny_v3_checkpoint(tmp_path_factory.mktemp("tiny-v3"))
    with mistral_serve(tmp_path_factory.mktemp("bench-server"), "--model", f"{V3_MODEL_ID}={checkpoint}",
                       "--kv-cache-memory-mb", "64") as server:
        yield server


def test_the_benchmark_reports_every_level_and_draws_the_chart(tiny_server, tmp_path):
    output = tmp_path / "serve.json"
    done = subprocess.run(
        [*BENCH, "--base-url", f"{tiny_server.url}/v1", "--model", V3_MODEL_ID, "--api-key", tiny_server.key,
         "--name", "tiny", "--concurrency", "1,2", "--prompt-tokens", "16", "--output-tokens", "4",
         "--ban-tokens", str(V3_EOS_ID), "--server-pid", str(tiny_server.process.pid), "--output", str(output)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr

    report = json.loads(output.read_text())
    assert report["workload"]["output_tokens"] == 4 and len(report["load_average"]["start"]) == 3
    [server] = report["servers"]
    assert server["name"] == "tiny" and server["extra_body"] == {"logit_bias": {str(V3_EOS_ID): -100}}
    assert [level["concurrency"] for level in server["levels"]] == [1, 2]
    for level in server["levels"]:
        assert level["num_requests"] == 4 and level["num_failures"] == 0, level["errors"]
        assert level["total_output_tokens"] == 16 and level["num_short"] == 0
        assert level["token_count_source"] == "usage" and level["mean_prompt_tokens"] > 16
        assert level["output_tokens_per_s"] > 0 and level["peak_rss_mb"] > 0
        for name in ("ttft_s", "itl_s", "e2e_s"):
            assert 0 < level[f"{name}_p50"] <= level[f"{name}_p99"]
    assert "| tiny | 2 |" in done.stdout
    assert (tmp_path / "serve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_failed_requests_are_counted_not_hidden(tiny_server, tmp_path):
    output = tmp_path / "serve.json"
    done = subprocess.run(
        [*BENCH, "--base-url", f"{tiny_server.url}/v1", "--model", V3_MODEL_ID, "--api-key", "msk-wrong",
         "--concurrency", "1", "--output-tokens", "2", "--warmup-requests", "0", "--no-chart",
         "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [level] = json.loads(output.read_text())["servers"][0]["levels"]
    assert level["num_failures"] == level["num_requests"] == 4
    assert level["errors"][0].startswith("HTTP 401")
    assert not (tmp_path / "serve.png").exists()
