"""What every command shares: the storage flags, Settings from the parsed flags, the database those
settings name, and tables. Its own module, so that the cli modules import it and not each other."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from mistral_serve.settings import Settings


def storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where the SQLite database lives (env MISTRAL_SERVE_DATA_DIR)")
    parser.add_argument("--database-url", help="sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/NAME "
                                               "(env MISTRAL_SERVE_DATABASE_URL; default: SQLite in the data dir)")


def settings_from(args: argparse.Namespace) -> Settings:
    """The flags a command was given (a flag's dest is its setting's name) over env over defaults."""
    return Settings.load({name: getattr(args, name, None) for name in Settings.model_fields})


def open_database(settings: Settings):
    """The settings' database, migrated to the newest schema: a session factory."""
    from mistral_serve.db.migrations import upgrade_to_head
    from mistral_serve.db.session import create_db_engine, create_session_factory

    url = settings.resolved_database_url
    upgrade_to_head(url)
    return create_session_factory(create_db_engine(url))


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "never"


def print_table(headers: tuple[str, ...], rows: list[tuple]) -> None:
    cells = [headers, *[tuple(str(cell) for cell in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
