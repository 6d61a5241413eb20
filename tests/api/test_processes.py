"""Real server processes: one killed mid-stream while its database is locked, and two replicas that
share one Redis."""

from __future__ import annotations

from pathlib import Path
import sqlite3
import time

import httpx

from tests.api.conftest import bearer, chat
from tests.api.servers import V3_MODEL_ID, LiveServer, away_from_window_end, create_key, mistral_serve

MODEL_ARGS = ("--kv-cache-memory-mb", "64")


def model_args(tiny_v3: Path) -> tuple[str, ...]:
    return ("--model", f"{V3_MODEL_ID}={tiny_v3}", *MODEL_ARGS)


def v3_chat(**fields) -> dict:
    return chat(model=V3_MODEL_ID, **fields)


def completion_id(server: LiveServer, **fields) -> str:
    """Run one chat request to its end; the id its reply carried (the usage row's request id)."""
    if not fields.get("stream"):
        response = httpx.post(server.url + "/v1/chat/completions", json=v3_chat(**fields),
                              headers=bearer(server.key), timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["id"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=v3_chat(**fields),
                      headers=bearer(server.key), timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert lines, "the stream sent no chunk"
    return httpx.Response(200, content=lines[-1][len("data: "):]).json()["id"]


def usage_request_ids(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute("SELECT request_id FROM usage")]


def wait_for_empty_backlog(server: LiveServer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = httpx.get(server.url + "/ready", timeout=10).json()
        if ready["usage_backlog_bytes"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"usage rows still waiting on disk after {timeout_s} s: {ready}")


def test_a_server_killed_mid_stream_loses_no_finished_row_and_leaves_the_database_readable(tmp_path, tiny_v3):
    database = tmp_path / "data" / "mistral-serve.db"
    with mistral_serve(tmp_path, *model_args(tiny_v3)) as server:
        finished = [completion_id(server, max_tokens=3)]
        wait_for_empty_backlog(server)
        # another writer holds the database: the server can read keys but write no usage row
        blocker = sqlite3.connect(database, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        finished += [completion_id(server, max_tokens=3), completion_id(server, max_tokens=3, stream=True)]
        assert httpx.get(server.url + "/ready", timeout=10).json()["usage_backlog_bytes"] > 0
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=bearer(server.key), timeout=60,
                          json=v3_chat(max_tokens=400, stream=True)) as running:
            next(line for line in running.iter_lines() if '"content"' in line)
            server.process.kill()  # SIGKILL: no shutdown code runs
            server.process.wait(timeout=30)
        blocker.rollback()
        blocker.close()

    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert usage_request_ids(database) == finished[:1]  # the others were only on disk

    with mistral_serve(tmp_path, *model_args(tiny_v3), key=server.key, log_name="restarted.log") as restarted:
        wait_for_empty_backlog(restarted)
        ready = httpx.get(restarted.url + "/ready", timeout=10).json()
        assert ready["database"] == "reachable"
    request_ids = usage_request_ids(database)
    assert set(finished) <= set(request_ids) and len(request_ids) == len(set(request_ids))

    # the raw key is nowhere on disk: not in the logs, the database or the usage spool
    secret = server.key.encode()
    for path in [tmp_path / "server.log", tmp_path / "restarted.log", *(tmp_path / "data").rglob("*")]:
        if path.is_file():
            assert secret not in path.read_bytes() and secret[4:] not in path.read_bytes(), path.name


def test_two_server_processes_sharing_one_redis_enforce_one_limit_and_one_login_brake(
        tmp_path, tiny_v3, empty_redis_url):
    key = create_key(tmp_path / "data", None, "--rpm", "3", email="replicas@example.com", name="limited")
    shared = {"settings": {"redis_url": empty_redis_url}, "key": key}
    with mistral_serve(tmp_path, *model_args(tiny_v3), log_name="first.log", **shared) as first, \
            mistral_serve(tmp_path, *model_args(tiny_v3), log_name="second.log", **shared) as second:
        away_from_window_end(60)
        responses = [httpx.post(server.url + "/v1/chat/completions", json=v3_chat(max_tokens=1),
                                headers=bearer(key), timeout=60) for server in (first, second, first, second, first)]
        assert [response.status_code for response in responses] == [200, 200, 200, 429, 429]
        assert [response.headers["x-ratelimit-remaining-requests"] for response in responses[:3]] == ["2", "1", "0"]
        assert all(response.headers["x-ratelimit-limit-requests"] == "3" for response in responses)
        assert all(0 < int(response.headers["retry-after"]) <= 60 for response in responses[3:])

        # guessing a password on one replica brakes the account on the other
        account = {"email": "guessed@example.com", "password": "correct horse battery staple"}
        assert httpx.post(first.url + "/api/account/signup", json=account, timeout=30).status_code == 202
        away_from_window_end(60)
        for _ in range(5):
            wrong = httpx.post(first.url + "/api/account/login", json={**account, "password": "guess"}, timeout=30)
            assert wrong.status_code == 401
        braked = httpx.post(second.url + "/api/account/login", json=account, timeout=30)
        assert braked.status_code == 429 and braked.json()["error"]["code"] == "too_many_attempts"
        assert 0 < int(braked.headers["retry-after"]) <= 60
