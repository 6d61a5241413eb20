"""Engines and sessions from a database URL: SQLite (WAL, foreign keys on) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 5000  # a writer waits this long for another one instead of failing at once


def normalize_url(url: str | URL) -> URL:
    """The URL with an explicit driver: `postgresql://` and `postgres://` mean psycopg 3 here."""
    url = make_url(url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {url.render_as_string(hide_password=True)!r}: "
                         "use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/NAME")
    return url


def create_db_engine(url: str | URL) -> Engine:
    url = normalize_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        create_private_file(Path(url.database).expanduser())
    engine = create_engine(url)
    event.listen(engine, "connect", _configure_sqlite)
    return engine


def create_private_file(path: Path) -> None:
    """The database file, and its folder when missing, readable by this user alone: it holds password
    and key hashes and every account's usage. (SQLite gives its -wal and -shm files the database
    file's permissions.) An existing file keeps the permissions its owner gave it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _configure_sqlite(connection, record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA foreign_keys=ON")  # SQLite ignores ON DELETE CASCADE otherwise
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    # rows stay readable after commit, without another round trip
    return sessionmaker(engine, expire_on_commit=False)
