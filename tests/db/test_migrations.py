"""Migrations: from an empty database, as an upgrade, idempotent, and equal to the models."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from mistral_serve.db.migrations import alembic_config, upgrade, upgrade_to_head
from mistral_serve.db.models import Base
from mistral_serve.db.session import create_db_engine


def revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def current_revision(url: str) -> str | None:
    engine = create_db_engine(url)
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    engine.dispose()
    return revision


def test_an_empty_database_migrates_to_the_models_schema(database_url):
    upgrade_to_head(database_url)
    assert current_revision(database_url) == revisions()[-1]
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) >= {"accounts", "api_keys"}
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                       Base.metadata)
    engine.dispose()
    assert differences == []


def test_an_upgrade_keeps_the_rows_and_running_it_again_changes_nothing(database_url):
    upgrade(database_url, revisions()[0])
    engine = create_db_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO accounts (id, email, created_at) VALUES (1, 'a@example.com', :now)"),
                           {"now": "2025-01-01 00:00:00"})
        connection.execute(text("INSERT INTO api_keys (id, account_id, name, prefix, key_hash, created_at) "
                                "VALUES (7, 1, 'old', 'abcdefgh', :hash, :now)"),
                           {"hash": "0" * 64, "now": "2025-01-01 00:00:00"})
    upgrade_to_head(database_url)
    upgrade_to_head(database_url)
    assert current_revision(database_url) == revisions()[-1]
    with engine.connect() as connection:
        accounts = connection.execute(text("SELECT id, email, is_enabled FROM accounts")).all()
        keys = connection.execute(text("SELECT id, account_id, name, key_hash, is_enabled FROM api_keys")).all()
    engine.dispose()
    assert [tuple(row) for row in accounts] == [(1, "a@example.com", True)]
    assert [tuple(row) for row in keys] == [(7, 1, "old", "0" * 64, True)]

