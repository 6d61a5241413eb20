"""API keys over HTTP: who gets in, who gets a 401, and what the database keeps."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import make_url

from mistral_serve.api.app import create_app
from mistral_serve.cli_settings import open_database
from mistral_serve.db import crud
from mistral_serve.db.models import Base
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, bearer, chat, new_key
from tests.api.servers import create_key
from tests.conftest import DATABASE_BACKENDS

API_DB_BACKENDS = DATABASE_BACKENDS

PREFIXES = ["/v1", "/api/ai"]


@pytest.fixture(scope="module")
def anonymous(app):
    """A client that sends no key."""
    with TestClient(app) as client:
        yield client


def assert_refused(response, words: str) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": None,
                     "code": "invalid_api_key"}
    assert words in error["message"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_good_key_is_served_on_both_styles(anonymous, api_key, prefix):
    response = anonymous.post(f"{prefix}/chat/completions", json=chat(max_tokens=1), headers=bearer(api_key))
    assert response.status_code == 200


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "Bearer "},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_a_missing_key_is_refused(anonymous, prefix, headers):
    response = anonymous.post(f"{prefix}/chat/completions", json=chat(max_tokens=1), headers=headers)
    assert_refused(response, "You didn't provide an API key")


@pytest.mark.parametrize("raw_key", ["msk-not-a-key", "sk-proj-abc", "x" * 5000])
def test_an_unknown_key_is_refused_without_being_echoed(anonymous, raw_key):
    response = anonymous.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(raw_key))
    assert_refused(response, "Incorrect API key provided")
    assert raw_key not in response.text


@pytest.mark.parametrize("prefix", PREFIXES)
def test_models_are_listed_without_a_key(anonymous, prefix):
    assert anonymous.get(f"{prefix}/models").status_code == 200
    assert anonymous.get(f"{prefix}/models/{MODEL_ID}").status_code == 200


def test_a_disabled_key_is_refused_at_once_and_served_again_when_enabled(anonymous, api_db):
    raw_key = new_key(api_db, name="toggled")
    request = dict(json=chat(max_tokens=1), headers=bearer(raw_key))
    assert anonymous.post("/v1/chat/completions", **request).status_code == 200
    with api_db() as session:
        crud.set_key_enabled_by_operator(session, crud.find_key_by_raw(session, raw_key), False)
    assert_refused(anonymous.post("/v1/chat/completions", **request), "disabled")
    with api_db() as session:
        crud.set_key_enabled_by_operator(session, crud.find_key_by_raw(session, raw_key), True)
    assert anonymous.post("/v1/chat/completions", **request).status_code == 200


def test_a_deleted_key_is_refused_at_once(anonymous, api_db):
    raw_key = new_key(api_db, name="deleted")
    request = dict(json=chat(max_tokens=1), headers=bearer(raw_key))
    assert anonymous.post("/v1/chat/completions", **request).status_code == 200
    with api_db() as session:
        crud.delete_key(session, crud.find_key_by_raw(session, raw_key))
    assert_refused(anonymous.post("/v1/chat/completions", **request), "Incorrect API key provided")


def test_a_disabled_account_takes_its_keys_with_it(anonymous, api_db):
    raw_key = new_key(api_db, email="gone@example.com")
    with api_db() as session:
        crud.set_account_enabled(session, crud.get_account_by_email(session, "gone@example.com"), False)
    response = anonymous.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(raw_key))
    assert_refused(response, "account this API key belongs to is disabled")


def test_a_used_key_records_when_it_was_last_used(anonymous, api_db):
    raw_key = new_key(api_db, name="timed")
    assert anonymous.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(raw_key)).status_code == 200
    with api_db() as session:
        key = crud.find_key_by_raw(session, raw_key)
        assert key.last_used_at is not None and key.last_used_at >= key.created_at


def test_the_raw_key_is_nowhere_in_the_database(anonymous, api_db, api_db_backend):
    raw_key = new_key(api_db, name="secret")
    assert anonymous.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(raw_key)).status_code == 200
    if api_db_backend == "sqlite":  # the files byte by byte, the -wal and -shm files too
        database = Path(make_url(str(api_db.kw["bind"].url)).database)
        stored = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))
    else:  # every row of every table, as text
        with api_db() as session:
            stored = "".join(str(row) for table in Base.metadata.sorted_tables
                             for row in session.execute(select(table))).encode()
    secret = raw_key.removeprefix("msk-")
    assert secret[:8].encode() in stored  # the prefix is kept, so the search below does find what is there
    assert raw_key.encode() not in stored and secret[8:].encode() not in stored


def test_a_key_made_on_the_command_line_is_the_one_the_server_checks(tmp_path, make_engine):
    """`mistral-serve keys create` in a subprocess; its last line, as a Bearer key, against an app on
    the same settings."""
    settings = Settings(data_dir=tmp_path / "data")
    raw_key = create_key(settings.data_dir, email="cli@example.com", name="from the command line")
    assert raw_key.startswith("msk-")

    db = open_database(settings)  # as `mistral-serve serve` opens it
    with TestClient(create_app(settings, {MODEL_ID: AsyncEngine(make_engine())}, db)) as client:
        response = client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(raw_key))
        assert response.status_code == 200
        assert_refused(client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(raw_key + "x")),
                       "Incorrect API key provided")
    db.kw["bind"].dispose()


def test_a_database_that_cannot_answer_gives_503_not_500(tmp_path, make_engine):
    from mistral_serve.db.session import create_db_engine, create_session_factory

    unmigrated = create_session_factory(create_db_engine(f"sqlite:///{tmp_path / 'empty.db'}"))  # no tables
    with TestClient(create_app(Settings(data_dir=tmp_path), {MODEL_ID: AsyncEngine(make_engine())}, unmigrated)) as client:
        response = client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer("msk-anything"))
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["type"] == "service_unavailable"
    unmigrated.kw["bind"].dispose()
