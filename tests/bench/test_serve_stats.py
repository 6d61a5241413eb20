"""The serving benchmark's statistics, prompts and table, from known timestamps and results."""

import pytest

from serve import Workload, make_prompts
from serve_report import format_table
from serve_stats import RequestResult, percentile, summarize


def test_percentiles_interpolate_between_closest_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_a_request_times_its_first_token_gaps_and_decode_rate():
    result = RequestResult(sent_at=10.0, done_at=11.1, token_times=[10.5, 10.7, 11.0], usage_completion_tokens=3)
    assert result.ttft == pytest.approx(0.5)
    assert result.itls == pytest.approx([0.2, 0.3])
    assert result.e2e == pytest.approx(1.1)
    assert result.tpot == pytest.approx(0.3)  # (11.1 - 10.5) / (3 - 1)


def test_output_tokens_come_from_usage_else_from_chunks():
    chunks_only = RequestResult(sent_at=0.0, done_at=1.0, token_times=[0.1, 0.2])
    assert chunks_only.output_tokens == 2
    # a server may put several tokens in one chunk: its usage count wins
    assert RequestResult(sent_at=0.0, done_at=1.0, token_times=[0.1, 0.2], usage_completion_tokens=5).output_tokens == 5


def test_a_level_counts_successes_failures_and_short_replies():
    results = [
        RequestResult(sent_at=0.0, done_at=2.0, token_times=[0.5, 1.0, 1.5, 2.0], usage_completion_tokens=4,
                      prompt_tokens=10),
        RequestResult(sent_at=0.0, done_at=1.0, token_times=[0.25, 1.0], prompt_tokens=20),  # stopped early
        RequestResult(sent_at=0.0, done_at=0.1, error="HTTP 500: boom"),
    ]
    stats = summarize(results, duration_s=2.0, max_tokens=4)
    assert stats["num_requests"] == 3 and stats["num_failures"] == 1 and stats["errors"] == ["HTTP 500: boom"]
    assert stats["request_throughput"] == pytest.approx(1.0)  # 2 done in 2 s
    assert stats["output_tokens_per_s"] == pytest.approx(3.0)  # (4 + 2) / 2 s
    assert stats["num_short"] == 1 and stats["mean_output_tokens"] == pytest.approx(3.0)
    assert stats["mean_prompt_tokens"] == pytest.approx(15.0)
    assert stats["token_count_source"] == "chunks/usage"
    assert stats["ttft_s_p50"] == pytest.approx(0.375)  # between 0.25 and 0.5
    assert stats["itl_s_p50"] == pytest.approx(0.5)  # gaps 0.5, 0.5, 0.5, 0.75
    assert stats["itl_s_p99"] == pytest.approx(0.7425)
    assert stats["e2e_s_p99"] == pytest.approx(1.99)
    with pytest.raises(ValueError):
        summarize(results, duration_s=0.0, max_tokens=4)


def test_prompts_are_fixed_by_seed_and_number_and_near_the_asked_length():
    workload = Workload(prompt_tokens=64, seed=3)
    first = make_prompts(8, workload)
    assert first == make_prompts(8, workload)
    assert make_prompts(4, workload, start=4) == first[4:]  # a prompt depends on its number only
    assert make_prompts(8, Workload(prompt_tokens=64, seed=4)) != first
    assert len({p[0]["content"] for p in first}) == 8
    for prompt in first:
        num_words = len(prompt[0]["content"].split())
        assert 64 * 0.75 * 0.7 <= num_words <= 64 * 0.75 * 1.3


def test_concurrency_levels_send_two_requests_per_client_and_at_least_four():
    workload = Workload(concurrencies=(1, 4, 16))
    assert [workload.num_requests_at(level) for level in workload.levels()] == [4, 8, 32]
    assert Workload(request_rates=(2.0,), num_requests=10).levels() == [{"concurrency": None, "request_rate": 2.0}]


def _level(concurrency: int, tokens_per_s: float, ttft: float) -> dict:
    return {"concurrency": concurrency, "request_rate": None, "request_throughput": 1.0,
            "output_tokens_per_s": tokens_per_s, "ttft_s_p50": ttft, "ttft_s_p99": ttft, "itl_s_p50": 0.01,
            "itl_s_p99": 0.02, "e2e_s_p50": 1.0, "e2e_s_p99": 1.5, "mean_output_tokens": 128.0,
            "num_failures": 0, "num_requests": 4, "peak_rss_mb": None}


def test_the_table_gives_each_server_as_a_multiple_of_the_reference():
    report = {"workload": {"request_rates": ()}, "cpu_count": 2,
              "load_average": {"start": [1.0, 1.0, 1.0], "end": [2.0, 1.0, 1.0]},
              "servers": [{"name": "ref", "levels": [_level(1, 100.0, 0.2)]},
                          {"name": "ours", "levels": [_level(1, 150.0, 0.1)]}]}
    table = format_table(report, reference="ref")
    ours = next(line for line in table.splitlines() if line.startswith("| ours"))
    assert "| 1.50× | 0.50× |" in ours
    assert "load average" in table
