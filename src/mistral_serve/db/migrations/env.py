"""Alembic's entry point: migrate the engine that `alembic_config(engine)` carries."""

from alembic import context
from sqlalchemy import text

from mistral_serve.db.models import Base

# any 64-bit number, the same in every process: replicas starting together migrate one at a time
POSTGRES_MIGRATION_LOCK = 0x6D73_6D69_6772_6174


def run_migrations() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("run migrations through mistral_serve.db.migrations (alembic_config(engine))")
    with engine.connect() as connection:
        is_sqlite = connection.dialect.name == "sqlite"
        if is_sqlite:
            # a batch migration copies a table, drops it and renames the copy: with foreign keys on, the
            # drop would cascade to the rows that refer to it (an account's keys and sessions)
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # a pragma outside the migration's transaction (SQLite ignores it inside)
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")  # SQLite's ALTER is limited
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_MIGRATION_LOCK})
            context.run_migrations()
        if is_sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


run_migrations()
