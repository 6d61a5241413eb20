"""`mistral-serve accounts …` and `keys …`, in process, on a database in a temporary data dir."""

import io

import pytest

from mistral_serve.cli import main
from mistral_serve.cli_settings import open_database
from mistral_serve.db import crud
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
        assert key.name == "laptop" and key.requests_per_minute == 10
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
    assert status == 0 and [line.split()[1:4] for line in listing[1:]] == [
        ["bob@example.com", "yes", "yes"], ["cli@example.com", "yes", "no"]]
    assert run("accounts", "disable", "--email", "bob@example.com")[0] == 0
    assert run("accounts", "list")[1][1].split()[1:3] == ["bob@example.com", "no"]


def test_without_a_terminal_a_password_must_come_from_stdin_or_be_declined(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert run("accounts", "create", "--email", "bob@example.com")[0] == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert run("accounts", "create", "--email", "bob@example.com", "--password-stdin")[0] == 2
