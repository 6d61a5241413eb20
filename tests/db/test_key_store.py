"""The key check while the database is away: recently accepted keys ride out the outage, for a while."""

import pytest

from mistral_serve.db import crud
from mistral_serve.db.key_store import KeyRefused, KeyStore, KeyStoreUnavailable
from mistral_serve.db.session import create_db_engine, create_session_factory


class Switchable:
    """A session factory whose database can be made unreachable: its queries then fail, as they do
    when the server is gone."""

    def __init__(self, sessions, tmp_path):
        self.sessions = sessions
        self.unreachable = create_session_factory(create_db_engine(f"sqlite:///{tmp_path}/no/such/dir/x.db"))
        self.is_down = False

    def __call__(self):
        return self.unreachable() if self.is_down else self.sessions()


@pytest.fixture
def raw_keys(db):
    with db() as session:
        account = crud.create_account(session, "ann@example.com", password=None)
        return crud.create_api_key(session, account, "used")[1], crud.create_api_key(session, account, "unused")[1]


def test_a_key_accepted_recently_is_accepted_during_an_outage_until_the_grace_ends(db, raw_keys, tmp_path):
    used, unused = raw_keys
    now = [100.0]
    sessions = Switchable(db, tmp_path)
    store = KeyStore(sessions, outage_grace_s=60, clock=lambda: now[0])
    accepted = store.authenticate(used)
    sessions.is_down = True
    now[0] += 59
    assert store.authenticate(used) == accepted
    with pytest.raises(KeyStoreUnavailable):
        store.authenticate(unused)  # never checked: cannot be vouched for
    now[0] += 2
    with pytest.raises(KeyStoreUnavailable):
        store.authenticate(used)


def test_a_key_refused_once_is_not_vouched_for_in_a_later_outage(db, raw_keys, tmp_path):
    used, _ = raw_keys
    sessions = Switchable(db, tmp_path)
    store = KeyStore(sessions, outage_grace_s=60)
    store.authenticate(used)
    with db() as session:
        crud.set_key_enabled_by_operator(session, crud.find_key_by_raw(session, used), False)
    with pytest.raises(KeyRefused):
        store.authenticate(used)
    sessions.is_down = True
    with pytest.raises(KeyStoreUnavailable):
        store.authenticate(used)


def test_without_a_grace_an_outage_refuses_every_key(db, raw_keys, tmp_path):
    sessions = Switchable(db, tmp_path)
    store = KeyStore(sessions)
    store.authenticate(raw_keys[0])
    sessions.is_down = True
    with pytest.raises(KeyStoreUnavailable):
        store.authenticate(raw_keys[0])
