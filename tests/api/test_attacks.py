"""Attacks on the log-in and on a server reached over loopback, each against a real `mistral-serve serve`
process as a user starts it: guesses sent in parallel, a stranger locking an owner out, an email
oracle in sign-up, a page that rebinds its name to 127.0.0.1, and forged X-Forwarded-* headers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import PASSWORD, Browser, error_code
from tests.api.servers import V3_MODEL_ID, LiveServer, away_from_window_end, mistral_serve

# from browsers that never logged in to the account (README "Log-ins, hosts and proxies")
MAX_GUESSES_PER_MINUTE = 5  # per email
MAX_GUESSES_PER_MINUTE_FROM_ONE_ADDRESS = 10


def serve_tiny(tmp_path: Path, tiny_v3: Path, *flags: str):
    return mistral_serve(tmp_path, "--model", f"{V3_MODEL_ID}={tiny_v3}", "--kv-cache-memory-mb", "64", *flags)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_v3):
    """A server as `serve` runs by default: no proxy is believed."""
    with serve_tiny(tmp_path_factory.mktemp("plain"), tiny_v3) as server:
        yield server


@pytest.fixture
def fresh_server(tmp_path, tiny_v3):
    """A server of the test's own, for attacks that brake the loopback address itself."""
    with serve_tiny(tmp_path, tiny_v3) as server:
        yield server


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, tiny_v3):
    """A server behind a proxy on the loopback: X-Forwarded-For says which client each request is from."""
    with serve_tiny(tmp_path_factory.mktemp("proxied"), tiny_v3, "--forwarded-allow-ips", "127.0.0.1") as server:
        yield server


def browser(server: LiveServer, address: str | None = None) -> Browser:
    """A browser of its own; behind the proxy, at `address`."""
    client = Browser(server.url)
    if address:
        client.http.headers["X-Forwarded-For"] = address
    return client


def log_in(client: Browser, email: str, password: str = PASSWORD) -> httpx.Response:
    return client.post("/login", {"email": email, "password": password})


def open_account(server: LiveServer, email: str, address: str | None = None) -> Browser:
    """A browser that signed up and logged in (so holds a device cookie for `email`), then logged out."""
    client = browser(server, address)
    assert client.post("/signup", {"email": email, "password": PASSWORD}).status_code == 202
    assert log_in(client, email).status_code == 200
    assert client.post("/logout").status_code == 204
    return client


def test_thirty_parallel_guesses_get_no_more_than_the_budget_checked(fresh_server):
    open_account(fresh_server, "parallel@example.com")
    away_from_window_end(60)
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: log_in(browser(fresh_server), "parallel@example.com", "guess"), range(30)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [401] * MAX_GUESSES_PER_MINUTE + [429] * (30 - MAX_GUESSES_PER_MINUTE)
    assert all(error_code(answer) == "too_many_attempts" and 0 < int(answer.headers["retry-after"]) <= 60
               for answer in answers if answer.status_code == 429)


def test_a_strangers_failures_from_anywhere_do_not_stop_the_owners_browser(proxied):
    owners_browser = open_account(proxied, "owner@example.com", "192.0.2.1")
    away_from_window_end(60)
    strangers = [log_in(browser(proxied, f"198.51.100.{n}"), "owner@example.com", "guess") for n in range(30)]
    assert [answer.status_code for answer in strangers] == [401] * MAX_GUESSES_PER_MINUTE + [429] * 25
    # a new browser, even at the owner's address, waits; the owner's own browser does not
    assert log_in(browser(proxied, "192.0.2.1"), "owner@example.com").status_code == 429
    assert log_in(owners_browser, "owner@example.com").status_code == 200
    assert owners_browser.get("/me").json()["email"] == "owner@example.com"


def test_a_forged_x_forwarded_for_does_not_escape_the_address_brake(fresh_server, proxied):
    """Without --forwarded-allow-ips, a client writing a new X-Forwarded-For on each guess is still one
    address, braked as one, while a browser that logged in there before keeps logging in; behind a
    named proxy, the addresses it forwards are told apart."""
    colleague = open_account(fresh_server, "colleague@example.com")
    away_from_window_end(60)
    forged = [log_in(browser(fresh_server, f"203.0.113.{n}"), f"forged{n}@example.com", "guess") for n in range(30)]
    assert [answer.status_code for answer in forged] == [401] * MAX_GUESSES_PER_MINUTE_FROM_ONE_ADDRESS + [429] * (
        30 - MAX_GUESSES_PER_MINUTE_FROM_ONE_ADDRESS)
    assert log_in(browser(fresh_server), "colleague@example.com").status_code == 429  # a stranger's browser
    assert log_in(colleague, "colleague@example.com").status_code == 200
    forwarded = [log_in(browser(proxied, f"203.0.113.{n}"), f"forwarded{n}@example.com", "guess") for n in range(30)]
    assert [answer.status_code for answer in forwarded] == [401] * 30


def test_x_forwarded_proto_makes_cookies_secure_only_from_a_named_proxy(server, proxied):
    for live, address in ((server, None), (proxied, "192.0.2.50")):
        email = f"tls-{live.url.rsplit(':', 1)[1]}@example.com"
        client = browser(live, address)
        assert client.post("/signup", {"email": email, "password": PASSWORD}).status_code == 202
        response = client.post("/login", {"email": email, "password": PASSWORD},
                               headers={"X-Forwarded-Proto": "https"})
        assert response.status_code == 200
        cookies = response.headers.get_list("set-cookie")
        assert len(cookies) == 3
        assert all(("; secure" in cookie.lower()) == (live is proxied) for cookie in cookies)


def test_sign_up_answers_alike_whether_the_email_has_an_account_or_not(server):
    open_account(server, "exists@example.com")
    taken = browser(server).post("/signup", {"email": "exists@example.com", "password": "someone else's"})
    new = browser(server).post("/signup", {"email": "new-here@example.com", "password": "someone else's"})
    assert (taken.status_code, taken.content) == (new.status_code, new.content) and taken.status_code == 202
    assert taken.headers.get_list("set-cookie") == new.headers.get_list("set-cookie") == []
    assert log_in(browser(server), "exists@example.com").status_code == 200  # its owner's password still works


def test_a_page_that_rebinds_its_name_to_the_loopback_gets_a_400(server):
    port = server.url.rsplit(":", 1)[1]
    for host in (f"rebound.example:{port}", "rebound.example"):
        for method, path in (("GET", "/v1/models"), ("POST", "/api/account/login")):
            response = httpx.request(method, server.url + path, headers={"Host": host},
                                     json={"email": "owner@example.com", "password": "guess"}, timeout=30)
            assert response.status_code == 400 and error_code(response) == "host_not_allowed", (host, path)
            assert "--allowed-hosts" in response.json()["error"]["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200
