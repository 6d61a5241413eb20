"""The tenant's ways around the operator's limits, each against a real `mistral-serve serve` process
as an operator runs it, with keys, plans and invitations made by the `mistral-serve` command:
lifting a ceiling, re-enabling what the operator disabled, signing up when closed, work before a
429, token limits overrun with n × max_tokens, output amplification, caps spread over keys."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import bearer
from tests.api.helpers import PASSWORD, Browser, error_code
from tests.api.servers import CLI, V3_MODEL_ID, LiveServer, away_from_window_end, create_key, mistral_serve

MAX_PER_ACCOUNT = 3


def command(data_dir: Path, *args: str, stdin: str | None = None) -> list[str]:
    """`mistral-serve *args` as the operator runs it; its output lines."""
    done = subprocess.run([CLI, *args, "--data-dir", str(data_dir)], capture_output=True, text=True, input=stdin,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def chat(**fields) -> dict:
    return {"model": V3_MODEL_ID, "messages": [{"role": "user", "content": "Say something."}], **fields}


def post(server: LiveServer, key: str, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=bearer(key), timeout=60)


@pytest.fixture(scope="module")
def operated(tmp_path_factory, tiny_v3):
    """A server that takes sign-ups by invitation, caps each account at 3 requests in flight, and bounds
    log probabilities low enough to reach with the tiny model's context."""
    work_dir = tmp_path_factory.mktemp("operated")
    data_dir = work_dir / "data"
    command(data_dir, "plans", "create", "small", "--max-n", "2", "--max-output-tokens", "64", "--rpm", "1000")
    command(data_dir, "plans", "create", "other-models", "--models", "some-other-model")
    with mistral_serve(work_dir, "--model", f"{V3_MODEL_ID}={tiny_v3}", "--kv-cache-memory-mb", "64",
                       "--signup", "invite", "--max-concurrent-requests-per-account", str(MAX_PER_ACCOUNT),
                       "--max-logprobs-per-request", "1000") as server:
        yield server, data_dir


def operator_key(data_dir: Path, email: str, *flags: str, name: str = "k") -> str:
    return create_key(data_dir, None, *flags, email=email, name=name)


def owner_browser(server: LiveServer, data_dir: Path, email: str) -> Browser:
    """The dashboard of an account the operator made with a password."""
    command(data_dir, "accounts", "create", "--email", email, "--password-stdin", stdin=PASSWORD + "\n")
    browser = Browser(server.url)
    assert browser.post("/login", {"email": email, "password": PASSWORD}).status_code == 200
    return browser


def test_the_owner_cannot_lift_the_operators_ceiling_on_a_key(operated):
    server, data_dir = operated
    away_from_window_end(60)
    owner = owner_browser(server, data_dir, "owner@example.com")
    key = operator_key(data_dir, "owner@example.com", "--rpm", "1")
    [listed] = owner.get("/keys").json()["data"]
    for limits in ({"requests_per_minute": 1000}, {}):  # higher, or none at all
        lifted = owner.patch(f"/keys/{listed['id']}", {"limits": limits})
        assert lifted.status_code == 403 and error_code(lifted) == "above_ceiling"
    assert owner.patch(f"/keys/{listed['id']}", {"limits": {"requests_per_minute": 1}}).status_code == 200
    assert post(server, key, chat(max_tokens=1)).status_code == 200
    refused = [post(server, key, chat(max_tokens=1)) for _ in range(3)]
    assert [response.status_code for response in refused] == [429] * 3


def test_a_key_the_operator_disabled_stays_disabled_whatever_its_owner_does(operated):
    server, data_dir = operated
    owner = owner_browser(server, data_dir, "disabled@example.com")
    key = operator_key(data_dir, "disabled@example.com")
    [line] = command(data_dir, "keys", "list", "--email", "disabled@example.com")[1:]
    command(data_dir, "keys", "disable", "--id", line.split()[0], "--reason", "abuse reported")
    [listed] = owner.get("/keys").json()["data"]
    enabled = owner.patch(f"/keys/{listed['id']}", {"is_enabled": True})
    assert enabled.status_code == 403 and error_code(enabled) == "disabled_by_operator"
    refused = post(server, key, chat(max_tokens=1))
    assert refused.status_code == 401 and "abuse reported" in refused.json()["error"]["message"]


def test_an_account_the_operator_disables_is_refused_from_its_next_request(operated):
    server, data_dir = operated
    key = operator_key(data_dir, "soon-off@example.com")
    assert post(server, key, chat(max_tokens=1)).status_code == 200
    command(data_dir, "accounts", "disable", "--email", "soon-off@example.com", "--reason", "invoice unpaid")
    refused = post(server, key, chat(max_tokens=1))
    assert refused.status_code == 401 and "invoice unpaid" in refused.json()["error"]["message"]


def test_signing_up_takes_an_invitation_and_each_code_works_once(operated):
    server, data_dir = operated
    browser = Browser(server.url)
    assert browser.get("/signup").json() == {"mode": "invite"}
    uninvited = browser.post("/signup", {"email": "stranger@example.com", "password": PASSWORD})
    assert uninvited.status_code == 403 and error_code(uninvited) == "invite_required"
    forged = browser.post("/signup", {"email": "stranger@example.com", "password": PASSWORD, "invite_code": "msi-x"})
    assert forged.status_code == 403 and error_code(forged) == "invalid_invite"
    code = command(data_dir, "invites", "create", "--plan", "small")[-1]
    invited = browser.post("/signup", {"email": "invited@example.com", "password": PASSWORD, "invite_code": code})
    assert invited.status_code == 202
    assert browser.post("/login", {"email": "invited@example.com", "password": PASSWORD}).status_code == 200
    again = Browser(server.url).post("/signup", {"email": "second@example.com", "password": PASSWORD,
                                                 "invite_code": code})
    assert again.status_code == 403 and error_code(again) == "invalid_invite"


def test_signing_up_on_a_closed_server_is_refused(tmp_path, tiny_v3):
    with mistral_serve(tmp_path, "--model", f"{V3_MODEL_ID}={tiny_v3}", "--kv-cache-memory-mb", "64",
                       "--signup", "closed") as server:
        refused = Browser(server.url).post("/signup", {"email": "someone@example.com", "password": PASSWORD})
    assert refused.status_code == 403 and error_code(refused) == "signup_closed"


def test_an_operator_key_is_not_attached_to_an_account_a_stranger_opened_first(operated):
    server, data_dir = operated
    code = command(data_dir, "invites", "create")[-1]  # the stranger got in somehow: an invitation, or open sign-up
    stranger = Browser(server.url)
    assert stranger.post("/signup", {"email": "ceo@example.com", "password": PASSWORD,
                                     "invite_code": code}).status_code == 202
    done = subprocess.run([CLI, "keys", "create", "--email", "ceo@example.com", "--name", "prod", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--attach-to-self-registered" in done.stderr
    assert stranger.post("/login", {"email": "ceo@example.com", "password": PASSWORD}).status_code == 200
    assert stranger.get("/keys").json()["data"] == []


def test_a_key_over_its_rpm_gets_its_429_before_its_schema_is_compiled_or_its_prompt_read(operated):
    server, data_dir = operated
    away_from_window_end(60)
    key = operator_key(data_dir, "rpm1@example.com", "--rpm", "1")
    assert post(server, key, chat(max_tokens=1)).status_code == 200
    # a schema the grammar compiler would refuse (400), and a 2 MB prompt (400: past the context): both 429 first
    unsupported = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}
    huge = {"model": V3_MODEL_ID, "messages": [{"role": "user", "content": "word " * 400_000}]}
    for body in (chat(response_format=unsupported), huge):
        refused = post(server, key, body)
        assert refused.status_code == 429 and error_code(refused) == "rate_limit_exceeded"
    # a request refused for its content is counted too: the next window's first such request uses it up
    usage = command(data_dir, "usage", "--email", "rpm1@example.com")
    assert usage[1].split()[3:5] == ["3", "2"]  # three requests, two of them failed (limited)


def test_tokens_per_minute_and_budgets_bound_what_n_times_max_tokens_may_use(operated):
    """The attack: a key of 50 tokens per minute used 1,231 tokens in one request (n=4, max_tokens=300)."""
    server, data_dir = operated
    away_from_window_end(60)
    for flags in (("--tpm", "60"), ("--token-budget", "60", "--budget-period", "day")):
        key = operator_key(data_dir, f"tokens-{flags[0][2:]}@example.com", *flags)
        refused = post(server, key, chat(n=4, max_tokens=300, ignore_eos=True))
        assert refused.status_code == 429, refused.text
        assert error_code(refused) in ("rate_limit_exceeded", "insufficient_quota")
        lowered = post(server, key, chat(n=4, ignore_eos=True))  # without max_tokens: lowered to fit
        assert lowered.status_code == 200, lowered.text
        assert lowered.json()["usage"]["total_tokens"] <= 60


def test_the_plan_bounds_choices_output_and_models(operated):
    server, data_dir = operated
    command(data_dir, "accounts", "create", "--email", "small@example.com", "--no-password", "--plan", "small")
    key = operator_key(data_dir, "small@example.com")
    too_many = post(server, key, chat(n=3, max_tokens=1))
    assert too_many.status_code == 400 and error_code(too_many) == "plan_limit_exceeded"
    too_long = post(server, key, chat(max_tokens=65))
    assert too_long.status_code == 400 and error_code(too_long) == "plan_limit_exceeded"
    capped = post(server, key, chat(ignore_eos=True))  # without max_tokens: the plan's 64 at most
    assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] <= 64
    command(data_dir, "accounts", "create", "--email", "elsewhere@example.com", "--no-password", "--plan",
            "other-models")
    refused = post(server, operator_key(data_dir, "elsewhere@example.com"), chat(max_tokens=1))
    assert refused.status_code == 403 and error_code(refused) == "model_not_in_plan"


def test_log_probabilities_cannot_amplify_a_reply_past_the_servers_bound(operated):
    server, data_dir = operated
    key = operator_key(data_dir, "logprobs@example.com")
    refused = post(server, key, chat(n=4, max_tokens=20, logprobs=True, top_logprobs=20))  # 4 × 20 × 21 > 1000
    assert refused.status_code == 400 and error_code(refused) == "output_too_large"
    lowered = post(server, key, chat(n=4, logprobs=True, top_logprobs=20, ignore_eos=True))
    assert lowered.status_code == 200
    assert all(len(choice["logprobs"]["content"]) <= 1000 // (4 * 21) for choice in lowered.json()["choices"])


def test_an_accounts_cap_on_requests_in_flight_holds_across_its_keys(operated):
    """The attack: 36 requests on one key gave four 429s, but over two keys of one account all 36 ran."""
    server, data_dir = operated
    keys = [operator_key(data_dir, "spread@example.com", name=f"k{index}") for index in range(2)]
    endless = chat(max_tokens=400, ignore_eos=True, stream=True)

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            streams, held = [], []
            for index in range(MAX_PER_ACCOUNT):  # in flight, spread over both keys, each until we close it
                stream = client.stream("POST", server.url + "/v1/chat/completions", json=endless,
                                       headers=bearer(keys[index % 2]))
                response = await stream.__aenter__()
                assert response.status_code == 200
                streams.append(stream)
                held.append(response)
            refused = [await client.post(server.url + "/v1/chat/completions", json=chat(max_tokens=1),
                                         headers=bearer(key)) for key in keys]
            for stream in streams:
                await stream.__aexit__(None, None, None)
            return refused
    refused = asyncio.run(scenario())
    for response in refused:
        assert response.status_code == 429 and error_code(response) == "too_many_concurrent_requests"
        assert "account" in response.json()["error"]["message"]
    time.sleep(1)  # the closed streams are counted out
    assert post(server, keys[0], chat(max_tokens=1)).status_code == 200
