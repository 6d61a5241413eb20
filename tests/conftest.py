"""Fixtures shared across the test tree."""

import os

import pytest

from mistral_serve.model.checkpoints.loader import CheckpointError, find_demo_gguf
from mistral_serve.tokenizer import load_tokenizer
from tests.services import PostgresServer, RedisServer, ServiceFailed, ServiceUnavailable
from tests.tokenizers import V1_FILE, V3_FILE, checkpoint_dir


@pytest.fixture(scope="session", autouse=True)
def _own_data_home(tmp_path_factory):
    """A default data directory of the tests' own, never the user's; the servers they start inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _test_client_host():
    """The apps that tests build answer Starlette's TestClient, whose requests say `Host: testserver`, as
    well as the loopback names (the default). Real server processes get no MISTRAL_SERVE_* variable
    (tests/api/servers.py): they keep the default."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MISTRAL_SERVE_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1,::1")
        yield


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


# Tokenizers: Mistral's v1 and v3 (mistral-common's test files) and the demo's, for the tokenizer
# and detokenizer tests
@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    return load_tokenizer(checkpoint_dir(tmp_path_factory, V1_FILE, "tokenizer.model.v1"))


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return load_tokenizer(checkpoint_dir(tmp_path_factory, V3_FILE, "tokenizer.model.v3"))


@pytest.fixture(scope="session")
def demo(demo_path):
    """Loaded once per session: it takes a few seconds."""
    return load_tokenizer(demo_path)


# The tiny random Mistral v0.3 checkpoint that real server processes serve (tests/api/servers.py), in
# the API and client-library tests
@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory):
    from tests.api.servers import write_tiny_v3_checkpoint

    return write_tiny_v3_checkpoint(tmp_path_factory.mktemp("tiny-v3"))


# Servers: PostgreSQL and Redis of the session's own (tests/services.py), each started on first use
# and stopped when the session ends. Where one cannot start, the tests that need it are skipped,
# except in CI, where a missing install step must fail the run rather than hide.
_servers: dict[str, object] = {}  # name → the running server, or why it could not start


def _server(name: str, start):
    if name not in _servers:
        try:
            _servers[name] = start()
        except (ServiceUnavailable, ServiceFailed) as error:
            _servers[name] = error  # tried once: the next test does not wait for it again
    server = _servers[name]
    if isinstance(server, ServiceUnavailable) and not os.environ.get("CI"):
        pytest.skip(f"{name} unavailable: {server}")
    if isinstance(server, Exception):
        pytest.fail(f"{name} unavailable: {server}", pytrace=False)
    return server


@pytest.fixture(scope="session", autouse=True)
def _stop_servers():
    yield
    for server in _servers.values():
        if not isinstance(server, Exception):
            server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The session's PostgreSQL server (its `postgres` database, as the superuser)."""
    return _server("postgresql", PostgresServer).url()


@pytest.fixture(scope="session")
def private_postgres() -> PostgresServer:
    """A PostgreSQL server of its own, for a test that stops and restarts it (`pause`, `resume`)."""
    return _server("private postgresql", PostgresServer)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The session's Redis server, shared by every test: use keys of the test's own, or `empty_redis_url`."""
    return _server("redis", RedisServer).url()


@pytest.fixture
def empty_redis_url(redis_url) -> str:
    """The session's Redis server, emptied before the test: key ids restart in every fresh database,
    so limit counters left by an earlier test would otherwise count against this one."""
    _server("redis", RedisServer).flush()
    return redis_url


# Databases: every storage test runs once per backend.
DATABASE_BACKENDS = ["sqlite", "postgresql"]


def database_url_for(backend: str, directory) -> str:
    """The URL of a new, empty database: a file in `directory`, or a database on the session's
    PostgreSQL server (dropped with the server, or earlier by `drop_database_for`)."""
    if backend == "sqlite":
        return f"sqlite:///{directory / 'mistral-serve.db'}"
    if backend == "postgresql":
        return _server("postgresql", PostgresServer).create_database()
    raise ValueError(f"no test database for {backend}")


def drop_database_for(url: str) -> None:
    """Drop a database that `database_url_for` made on the PostgreSQL server, connections and all."""
    if url.startswith("postgresql"):
        _server("postgresql", PostgresServer).drop_database(url)


@pytest.fixture(params=DATABASE_BACKENDS)
def database_url(request, tmp_path) -> str:
    """The URL of an empty database, not migrated."""
    url = database_url_for(request.param, tmp_path)
    yield url
    drop_database_for(url)


@pytest.fixture
def db(database_url):
    """A session factory on a database migrated to the newest schema."""
    from mistral_serve.db.migrations import upgrade_to_head
    from mistral_serve.db.session import create_db_engine, create_session_factory

    upgrade_to_head(database_url)
    engine = create_db_engine(database_url)
    yield create_session_factory(engine)
    engine.dispose()
