"""bench/gateway_overhead.py: what the gateway added, from known results, and a short live run on the demo model."""

import json
import subprocess
import sys

import pytest

from gateway_overhead import compare, format_table
from serve_stats import RequestResult
from tests.bench.conftest import BENCH_DIR


def _request(ttft: float, tokens: int = 4) -> RequestResult:
    return RequestResult(sent_at=0.0, done_at=1.0, token_times=[ttft, 1.0], usage_completion_tokens=tokens)


def test_the_gateway_is_charged_its_ttft_and_the_tokens_per_second_it_lost():
    results = {"engine": [_request(0.100), _request(0.110), _request(0.120)],
               "gateway": [_request(0.103), _request(0.113), _request(0.123)]}
    # 12 tokens each: 12 tok/s straight, 10 through the gateway
    level = compare(8, results, {"engine": 1.0, "gateway": 1.2}, 4, {"engine": 0.0, "gateway": 0.03})
    assert level["added_ttft_ms_p50"] == pytest.approx(3.0)
    assert level["added_ttft_ms_p90"] == pytest.approx(3.0)
    low, high = level["added_ttft_ms_p50_interval"]
    assert low <= 3.0 <= high
    assert level["throughput_loss"] == pytest.approx(1 / 6)
    assert level["meets_ttft_target"] and not level["meets_throughput_target"]
    assert level["paths"]["gateway"]["gateway_cpu_ms_per_request"] == pytest.approx(10.0)
    report = {"levels": [level], "load_average": {"start": [1.0], "end": [1.0]}, "notes": {"shared_cores": "shared"}}
    table = format_table(report)
    assert "| 8 | 3 | 12.0 | 10.0 | +16.7 % |" in table
    assert "8 client(s): added TTFT p50 < 5 ms met; throughput loss < 3 % MISSED" in table


def test_a_path_with_no_tokens_has_no_loss_to_report():
    results = {"engine": [RequestResult(sent_at=0.0, done_at=1.0, error="HTTP 503")], "gateway": [_request(0.1)]}
    level = compare(1, results, {"engine": 1.0, "gateway": 1.0}, 4, {"engine": 0.0, "gateway": 0.0})
    assert level["throughput_loss"] is None and not level["meets_throughput_target"]
    assert "added_ttft_ms_p50" not in level and not level["meets_ttft_target"]


@pytest.mark.demo
def test_the_same_load_goes_to_the_engine_and_through_the_gateway(demo_path, tmp_path):
    output = tmp_path / "gateway_overhead.json"
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "gateway_overhead.py"), "--concurrency", "1,2", "--rounds", "2",
         "--num-requests", "2", "--output-tokens", "3", "--warmup-requests", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(output.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        for path in ("engine", "gateway"):
            stats = level["paths"][path]
            # two rounds of two requests, every reply run to 3 tokens and counted from its usage
            assert stats["num_failures"] == 0 and stats["total_output_tokens"] == 12
            assert stats["token_count_source"] == "usage"
        assert level["paths"]["gateway"]["gateway_cpu_ms_per_request"] > 0
    assert "added p50 ms" in done.stdout and "shared this machine's" in done.stdout
