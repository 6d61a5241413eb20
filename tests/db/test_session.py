"""Database URLs and connections: SQLite's settings, PostgreSQL's driver, the settings' default."""

from pathlib import Path

import pytest
from sqlalchemy import text

from mistral_serve.db.session import create_db_engine, normalize_url
from mistral_serve.settings import Settings


def test_sqlite_runs_in_wal_mode_with_foreign_keys_on(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'dir' / 'x.db'}"  # the folder is created
    engine = create_db_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


@pytest.mark.parametrize("url", ["postgresql://u:p@db/name", "postgres://u:p@db/name",
                                 "postgresql+psycopg://u:p@db/name"])
def test_postgresql_urls_use_psycopg_3(url):
    assert normalize_url(url).drivername == "postgresql+psycopg"


def test_other_databases_are_refused_without_showing_the_password():
    with pytest.raises(ValueError) as error:
        normalize_url("mysql://user:hunter2@db/name")
    assert "hunter2" not in str(error.value)


def test_every_command_finds_the_same_database_from_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_SERVE_DATA_DIR", str(tmp_path))
    default = Settings()
    assert default.resolved_database_url == f"sqlite:///{tmp_path / 'mistral-serve.db'}"
    monkeypatch.setenv("MISTRAL_SERVE_DATABASE_URL", "postgresql+psycopg://u@db/name")
    chosen = Settings()
    assert chosen.resolved_database_url == "postgresql+psycopg://u@db/name"
    monkeypatch.delenv("MISTRAL_SERVE_DATABASE_URL")
    assert Path(Settings.load({"data_dir": tmp_path / "flag"}).resolved_database_url[len("sqlite:///"):]).parent \
        == tmp_path / "flag"


def test_a_new_sqlite_database_and_its_folder_are_private_to_the_user(tmp_path):
    """The file holds password and key hashes: no other user of the machine may read it."""
    path = tmp_path / "data" / "mistral-serve.db"
    engine = create_db_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
        connection.commit()
    engine.dispose()
    assert path.parent.stat().st_mode & 0o077 == 0
    for file in path.parent.iterdir():  # the database and SQLite's -wal and -shm beside it
        assert file.stat().st_mode & 0o077 == 0, file.name
