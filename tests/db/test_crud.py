"""Accounts and keys through crud, on each test database."""

from datetime import timedelta

import pytest
from sqlalchemy import delete, select

from mistral_serve.db import crud
from mistral_serve.db.crud import AlreadyExists, KeyLimits
from mistral_serve.db.models import Account, ApiKey
from mistral_serve.security import hash_api_key, verify_password


def test_emails_are_normalised_and_unique(db):
    with db() as session:
        account = crud.create_account(session, "  Ann@Example.COM ", password=None)
        assert account.email == "ann@example.com"
        assert crud.get_account_by_email(session, "ANN@example.com").id == account.id
        with pytest.raises(AlreadyExists):
            crud.create_account(session, "ann@EXAMPLE.com", password=None)
        assert [a.email for a in crud.list_accounts(session)] == ["ann@example.com"]
        for bad in ("ann", "@example.com", "ann@", "ann@localhost", "an n@example.com"):
            with pytest.raises(ValueError):
                crud.create_account(session, bad, password=None)
        assert crud.get_account_by_email(session, "not an email") is None


def test_a_password_is_stored_as_an_argon2id_hash(db):
    with db() as session:
        account = crud.create_account(session, "bob@example.com", password="correct horse")
        nopass = crud.create_account(session, "cli@example.com", password=None)
    assert account.password_hash.startswith("$argon2id$") and "correct horse" not in account.password_hash
    assert verify_password(account.password_hash, "correct horse").is_valid
    assert not verify_password(account.password_hash, "wrong horse").is_valid
    assert nopass.password_hash is None and not verify_password(nopass.password_hash, "").is_valid
    with db() as session, pytest.raises(ValueError):
        crud.create_account(session, "short@example.com", password="short")


def test_a_key_is_found_by_its_raw_secret_and_stored_only_as_a_hash(db):
    with db() as session:
        account = crud.create_account(session, "ann@example.com", password=None)
        key, raw_key = crud.create_api_key(session, account, " laptop ", KeyLimits(requests_per_minute=10))
    assert raw_key.startswith("msk-") and key.prefix == raw_key[4:12] and key.name == "laptop"
    with db() as session:
        stored = session.scalars(select(ApiKey)).one()
        assert stored.key_hash == hash_api_key(raw_key) and raw_key not in vars(stored).values()
        found = crud.find_key_by_raw(session, raw_key)
        assert found.id == key.id and found.account.email == "ann@example.com"
        assert KeyLimits.of(found) == KeyLimits(requests_per_minute=10)
        assert found.is_enabled and found.last_used_at is None
        assert found.created_at.tzinfo is not None
        assert crud.find_key_by_raw(session, raw_key[:-1]) is None
        assert crud.find_key_by_raw(session, "") is None


def test_keys_are_listed_per_account_found_by_prefix_disabled_and_deleted(db):
    with db() as session:
        ann = crud.create_account(session, "ann@example.com", password=None)
        bob = crud.create_account(session, "bob@example.com", password=None)
        first, first_raw = crud.create_api_key(session, ann, "one")
        crud.create_api_key(session, ann, "two")
        crud.create_api_key(session, bob, "three")
        assert [k.name for k in crud.list_keys(session, ann)] == ["one", "two"]
        assert [k.name for k in crud.list_keys(session)] == ["one", "two", "three"]
        assert [k.id for k in crud.find_keys_by_prefix(session, f"msk-{first.prefix}…")] == [first.id]
        crud.set_key_enabled_by_operator(session, first, False)
    with db() as session:
        assert not crud.find_key_by_raw(session, first_raw).is_enabled
        crud.delete_key(session, crud.get_key(session, first.id))
    with db() as session:
        assert crud.find_key_by_raw(session, first_raw) is None
        assert [k.name for k in crud.list_keys(session, ann)] == ["two"]


def test_deleting_an_account_deletes_its_keys_in_the_database(db):
    with db() as session:
        ann = crud.create_account(session, "ann@example.com", password=None)
        _, raw_key = crud.create_api_key(session, ann, "one")
        session.execute(delete(Account).where(Account.id == ann.id))  # SQL, not the ORM cascade
        session.commit()
    with db() as session:
        assert crud.find_key_by_raw(session, raw_key) is None
        assert session.scalars(select(ApiKey)).all() == []


@pytest.mark.parametrize("limits", [
    dict(requests_per_minute=0), dict(tokens_per_minute=-5), dict(token_budget=100),
    dict(budget_period="day"), dict(token_budget=100, budget_period="week"), dict(requests_per_minute=True),
])
def test_invalid_limits_are_refused(limits):
    with pytest.raises(ValueError):
        KeyLimits(**limits)


def test_last_use_is_written_at_most_once_a_minute(db):
    with db() as session:
        key, raw_key = crud.create_api_key(session, crud.create_account(session, "a@example.com", None), "k")
        first = crud.find_key_by_raw(session, raw_key).created_at
        assert crud.touch_key_last_used(session, key.id, now=first)
        assert not crud.touch_key_last_used(session, key.id, now=first + timedelta(seconds=59))
        assert crud.touch_key_last_used(session, key.id, now=first + timedelta(seconds=61))
    with db() as session:
        assert crud.get_key(session, key.id).last_used_at == first + timedelta(seconds=61)
