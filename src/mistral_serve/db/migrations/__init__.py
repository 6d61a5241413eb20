"""Alembic migrations, run from code at start-up: the user needs no alembic.ini.

Revisions live in `versions/`, an ordered list. To add one after changing `db/models.py`, bring a
scratch database to head, then `alembic.command.revision(alembic_config(engine), "what changed",
autogenerate=True)` on it; read and edit what it wrote.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from mistral_serve.db.session import create_db_engine

MIGRATIONS_DIR = Path(__file__).parent


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade(url: str, revision: str) -> None:
    """Bring the database at `url` to `revision` ("head": the newest). Running it again does nothing."""
    engine = create_db_engine(url)
    try:
        command.upgrade(alembic_config(engine), revision)
    finally:
        engine.dispose()


def upgrade_to_head(url: str) -> None:
    upgrade(url, "head")
