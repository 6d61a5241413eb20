"""Fixtures shared across the test tree."""

import os

import pytest

from mistral_serve.model.loader import CheckpointError, find_demo_gguf


@pytest.fixture(scope="session")
def demo_path():
    """The demo model's GGUF file. `make test` installs it; where it is missing the demo tests are
    skipped, except in CI, where a missing install step must fail the run rather than hide."""
    try:
        return find_demo_gguf()
    except CheckpointError as error:
        if os.environ.get("CI"):
            pytest.fail(f"demo model not installed: {error}")
        pytest.skip(f"demo model not installed: {error}")


# Databases: every storage test runs once per backend here. PostgreSQL joins by adding its name and
# a branch in database_url_for that hands out a fresh, empty database.
DATABASE_BACKENDS = ["sqlite"]


def database_url_for(backend: str, directory) -> str:
    if backend == "sqlite":
        return f"sqlite:///{directory / 'mistral-serve.db'}"
    raise ValueError(f"no test database for {backend}")


@pytest.fixture(params=DATABASE_BACKENDS)
def database_url(request, tmp_path) -> str:
    """The URL of an empty database, not migrated."""
    return database_url_for(request.param, tmp_path)


@pytest.fixture
def db(database_url):
    """A session factory on a database migrated to the newest schema."""
    from mistral_serve.db.migrations import upgrade_to_head
    from mistral_serve.db.session import create_db_engine, create_session_factory

    upgrade_to_head(database_url)
    engine = create_db_engine(database_url)
    yield create_session_factory(engine)
    engine.dispose()
