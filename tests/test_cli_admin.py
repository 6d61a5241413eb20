"""`mistral-serve accounts …`, `keys …`, `plans …` and `invites …`, in process, on a database in a temporary data dir."""

import io

import pytest

from mistral_serve.cli import main
from mistral_serve.cli_settings import open_database
from mistral_serve.db import crud, invites, plans
from mistral_serve.db.plans import PlanLimits
from mistral_serve.settings import Settings


@pytest.fixture
def run(tmp_path, capsys):
    """run(*args) -> (exit status, stdout lines), with --data-dir set to a temporary folder."""
    def run(*args: str) -> tuple[int, list[str]]:
        status = main([*args, "--data-dir", str(tmp_path)])
        return status, capsys.readouterr().out.splitlines()
    run.settings = Settings(data_dir=tmp_path)
    return run


def test_keys_create_makes_the_account_and_prints_the_key_last(run):
    status, lines = run("keys", "create", "--email", "Ann@Example.com", "--name", "laptop", "--rpm", "10")
    assert status == 0
    raw_key = lines[-1]
    db = open_database(run.settings)
    with db() as session:
        key = crud.find_key_by_raw(session, raw_key)
        assert key.account.email == "ann@example.com" and key.account.password_hash is None
        assert key.name == "laptop" and key.ceiling_requests_per_minute == 10  # the operator's: a ceiling
    status, listing = run("keys", "list", "--email", "ann@example.com")
    assert status == 0 and len(listing) == 2 and f"msk-{key.prefix}…" in listing[1]
    assert raw_key not in "\n".join(listing) and raw_key[12:] not in "\n".join(listing)
    # with the key's usage so far
    with db() as session:
        crud.record_usage_batch(session, [crud.UsageRecord(
            request_id="chatcmpl-1", key_id=key.id, account_id=key.account_id, model="m", status="ok",
            http_status=200, duration_ms=5, prompt_tokens=30, completion_tokens=12)])
    header, row = run("keys", "list")[1]
    assert header.split()[-2:] == ["REQUESTS", "TOKENS"] and row.split()[-2:] == ["1", "42"]


def test_keys_are_disabled_enabled_and_deleted_by_prefix_or_id(run):
    raw_key = run("keys", "create", "--email", "a@example.com", "--name", "k")[1][-1]
    db = open_database(run.settings)

    def key():
        with db() as session:
            return crud.find_key_by_raw(session, raw_key)
    assert run("keys", "disable", "--prefix", raw_key[:12])[0] == 0 and not key().is_enabled
    assert run("keys", "enable", "--id", str(key().id))[0] == 0 and key().is_enabled
    assert run("keys", "delete", "--prefix", raw_key[4:12])[0] == 0 and key() is None
    assert run("keys", "delete", "--prefix", raw_key[4:12])[0] == 2


def test_accounts_are_created_with_a_password_from_stdin_listed_and_disabled(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert run("accounts", "create", "--email", "bob@example.com", "--password-stdin")[0] == 0
    assert run("accounts", "create", "--email", "cli@example.com", "--no-password")[0] == 0
    assert run("accounts", "create", "--email", "BOB@example.com", "--no-password")[0] == 2  # taken
    status, listing = run("accounts", "list")
    assert status == 0 and [line.split()[1:5] for line in listing[1:]] == [
        ["bob@example.com", "user", "yes", "yes"], ["cli@example.com", "user", "yes", "no"]]
    assert run("accounts", "disable", "--email", "bob@example.com", "--reason", "unpaid")[0] == 0
    assert run("accounts", "list")[1][1].split()[1:5] == ["bob@example.com", "user", "no", "(unpaid)"]


def test_operators_are_made_and_promoted_from_the_command_line(run):
    assert run("accounts", "create", "--email", "op@example.com", "--no-password", "--admin")[0] == 0
    assert run("accounts", "create", "--email", "ann@example.com", "--no-password")[0] == 0
    assert run("accounts", "promote", "--email", "ann@example.com")[0] == 0
    assert run("accounts", "demote", "--email", "op@example.com")[0] == 0
    with open_database(run.settings)() as session:
        assert {account.email: account.is_admin for account in crud.list_accounts(session)} == {
            "op@example.com": False, "ann@example.com": True}


def test_plans_are_created_updated_made_default_and_assigned(run):
    assert run("plans", "create", "free", "--rpm", "10", "--max-n", "2", "--models", "a,b", "--default")[0] == 0
    assert run("plans", "create", "pro", "--rpm", "600")[0] == 0
    assert run("plans", "create", "pro")[0] == 2  # taken
    assert run("plans", "update", "free", "--tpm", "1000", "--no-limit", "max-n")[0] == 0
    assert run("accounts", "create", "--email", "ann@example.com", "--no-password", "--plan", "pro")[0] == 0
    assert run("accounts", "create", "--email", "bob@example.com", "--no-password")[0] == 0
    assert run("accounts", "set-plan", "--email", "bob@example.com", "--plan", "nope")[0] == 2
    with open_database(run.settings)() as session:
        free = plans.get_plan(session, "free")
        assert PlanLimits.of(free) == PlanLimits(requests_per_minute=10, tokens_per_minute=1000, models=("a", "b"))
        by_email = {account.email: plans.account_plan(session, account) for account in crud.list_accounts(session)}
        assert by_email["ann@example.com"].name == "pro" and by_email["bob@example.com"].name == "free"
    assert run("plans", "set-default", "pro")[0] == 0
    assert run("plans", "delete", "free")[0] == 0
    status, listing = run("plans", "list")
    assert status == 0 and [line.split()[:2] for line in listing[1:]] == [["pro", "yes"]]


def test_an_operator_key_does_not_go_to_an_account_a_stranger_opened_by_signing_up(run):
    """Pre-hijacking: a stranger signs up with a customer's email before the operator makes the key."""
    with open_database(run.settings)() as session:
        crud.create_account(session, "customer@example.com", "stranger's password", is_self_registered=True)
    status, output = run("keys", "create", "--email", "customer@example.com", "--name", "prod")
    assert status == 2 and not any(line.startswith("msk-") for line in output)
    with open_database(run.settings)() as session:
        assert crud.list_keys(session) == []
    status, output = run("keys", "create", "--email", "customer@example.com", "--name", "prod",
                         "--attach-to-self-registered")
    assert status == 0 and output[-1].startswith("msk-")


def test_an_invitation_code_is_printed_once_and_listed_without_it(run):
    assert run("plans", "create", "pro", "--rpm", "600")[0] == 0
    status, output = run("invites", "create", "--plan", "pro", "--note", "for ann")
    code = output[-1]
    assert status == 0 and code.startswith("msi-")
    status, listing = run("invites", "list")
    assert status == 0 and "for ann" in listing[1] and code not in "\n".join(listing)
    with open_database(run.settings)() as session:
        account = invites.sign_up_with_invite(session, code, "ann@example.com", "a long password")
        assert account.is_self_registered and account.plan.name == "pro"
        with pytest.raises(invites.InviteRefused):  # once only
            invites.sign_up_with_invite(session, code, "bob@example.com", "a long password")


def test_without_a_terminal_a_password_must_come_from_stdin_or_be_declined(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert run("accounts", "create", "--email", "bob@example.com")[0] == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert run("accounts", "create", "--email", "bob@example.com", "--password-stdin")[0] == 2
