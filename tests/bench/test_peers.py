"""bench/peers.py on the demo model, with mistral-serve alone (the peers need a build of their own)."""

import json
import subprocess
import sys

import pytest

from tests.bench.conftest import BENCH_DIR

pytestmark = pytest.mark.demo


def test_peers_starts_benchmarks_and_stops_a_server(demo_path, tmp_path):
    output = tmp_path / "serve.json"
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "peers.py"), "--servers", "mistral-serve", "--gguf", str(demo_path),
         "--concurrency", "1", "--num-requests", "2", "--output-tokens", "3", "--output", str(output)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(output.read_text())
    [server] = report["servers"]
    assert server["name"] == "mistral-serve" and server["extra_body"] == {"ignore_eos": True}
    [level] = server["levels"]
    assert level["num_failures"] == 0 and level["total_output_tokens"] == 6 and level["peak_rss_mb"] > 0
    assert report["notes"]["gguf"] == demo_path.name
    assert output.with_suffix(".png").is_file()
