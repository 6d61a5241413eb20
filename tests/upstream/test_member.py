"""A member's circuit breaker: what takes it out of rotation, what brings it back, and what it tells
/ready and /metrics."""

import logging

import pytest

from mistral_serve.upstream.config import UpstreamSpec
from mistral_serve.upstream.member import Member

TOKEN = "s3cret-token"


def member(failure_threshold: int = 3) -> Member:
    return Member(UpstreamSpec("http://10.0.0.5:8001/v1", token=TOKEN), model_id="m",
                  failure_threshold=failure_threshold)


def test_failures_in_a_row_eject_and_a_success_starts_the_count_again():
    one = member(failure_threshold=3)
    one.record_failure("server_error", "HTTP 500")
    one.record_failure("broken", "the stream broke")
    one.record_success()
    one.record_failure("timeout", "ReadTimeout")
    one.record_failure("misconfigured", "HTTP 401")
    assert one.is_healthy
    one.record_failure("server_error", "HTTP 503")
    assert one.status().state == "ejected" and not one.status().is_healthy
    assert one.status().num_failures == 5
    assert one.status().num_errors == {"server_error": 2, "broken": 1, "timeout": 1, "misconfigured": 1}
    assert one.status().last_error == "HTTP 503"


def test_a_connect_error_ejects_at_once():
    one = member()
    one.record_failure("connect", "ConnectError: [Errno 111] Connection refused")
    assert one.status().state == "ejected"


def test_busy_is_no_failure():
    one = member(failure_threshold=1)
    for _ in range(5):
        one.record_busy("HTTP 429: busy")
    assert one.is_healthy and one.status().num_failures == 0 and one.status().num_errors == {"busy": 5}


def test_only_a_passing_health_check_brings_a_member_back():
    one = member(failure_threshold=1)
    one.record_failure("server_error", "HTTP 500")
    one.record_success()  # a stream that was already running ends well: the member stays out
    one.record_check("HTTP 503")
    assert not one.is_healthy
    one.record_check(None)
    assert one.is_healthy
    one.record_failure("server_error", "HTTP 500")  # the count started again when it came back
    assert not one.is_healthy


def test_health_checks_eject_a_healthy_member_after_two_failures_or_one_connect_error():
    one = member()
    one.record_check("HTTP 503")
    assert one.is_healthy
    one.record_check(None)
    one.record_check("ReadTimeout")
    assert one.is_healthy
    one.record_check("HTTP 503")
    assert not one.is_healthy and one.status().last_error == "health check: HTTP 503"
    other = member()
    other.record_check("ConnectError", is_connect_error=True)
    assert not other.is_healthy


def test_requests_in_flight_never_go_below_zero():
    one = member()
    one.acquire()
    one.acquire()
    one.release()
    assert one.status().num_in_flight == 1 and one.status().num_requests == 2
    one.release()
    with pytest.raises(RuntimeError, match="released more requests than it took"):
        one.release()
    assert one.status().num_in_flight == 0


def test_the_status_names_the_member_and_never_shows_its_token():
    status = member().status()
    assert (status.name, status.url, status.state) == ("10.0.0.5:8001", "http://10.0.0.5:8001/v1", "healthy")
    assert TOKEN not in repr(status)


def test_each_failure_and_each_change_of_state_is_logged_once(caplog):
    one = member(failure_threshold=2)
    with caplog.at_level(logging.WARNING, logger="mistral_serve.upstream"):
        one.record_failure("server_error", "HTTP 500")
        one.record_failure("server_error", "HTTP 502")
        one.record_check("HTTP 503")  # already out: nothing new to say
        one.record_check(None)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "upstream 10.0.0.5:8001 of m failed (server_error): HTTP 500",
        "upstream 10.0.0.5:8001 of m failed (server_error): HTTP 502",
        "upstream 10.0.0.5:8001 of m is out of rotation: 2 failure(s) in a row, the last: HTTP 502",
        "upstream 10.0.0.5:8001 of m is back in rotation: its health check answers 200",
    ]
