"""KeyStore: from a raw API key to the enabled key it names, checked against the database every time."""

from __future__ import annotations

from dataclasses import dataclass
import logging

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve.db import crud
from mistral_serve.db.crud import KeyLimits


log = logging.getLogger(__name__)


class KeyRefused(Exception):
    """The key cannot be used; the message says why, without repeating the key."""


class KeyStoreUnavailable(Exception):
    """The database did not answer: no key can be checked now."""


@dataclass(frozen=True)
class ActiveKey:
    """An enabled key of an enabled account, as requests see it: no hash, no ORM object."""

    id: int
    account_id: int
    name: str
    prefix: str
    limits: KeyLimits


class KeyStore:
    """No cache: a disabled or deleted key is refused on its next request, in every process that
    shares the database. One indexed read per request, and at most one write per key per minute."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def authenticate(self, raw_key: str) -> ActiveKey:
        with self.sessions() as session:
            try:
                key = crud.find_key_by_raw(session, raw_key)
            except SQLAlchemyError as error:
                log.error("cannot read API keys: %s", error)
                raise KeyStoreUnavailable("The key store is unavailable; try again shortly.") from None
            if key is None:
                raise KeyRefused("Incorrect API key provided. You can create a key with "
                                 "`mistral-serve keys create` and list yours with `mistral-serve keys list`.")
            if not key.is_enabled:
                raise KeyRefused(f"The API key msk-{key.prefix}… is disabled; enable it to use it again.")
            if not key.account.is_enabled:
                raise KeyRefused("The account this API key belongs to is disabled.")
            active = ActiveKey(key.id, key.account_id, key.name, key.prefix, KeyLimits.of(key))
            try:
                crud.touch_key_last_used(session, key.id)
            except SQLAlchemyError as error:  # a busy database must not refuse a valid key
                log.warning("cannot record the last use of key %d: %s", key.id, error)
        return active
