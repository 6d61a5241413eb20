"""The servers the storage and limiter tests run against really start, and hand out what they say."""

from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.engine import make_url

from mistral_serve.db.session import create_db_engine
from tests.conftest import database_url_for, drop_database_for


def test_postgres_url_is_a_postgresql_server_on_loopback(postgres_url):
    engine = create_db_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version()")).scalar().startswith("PostgreSQL")
        assert connection.execute(text("SELECT inet_server_addr()::text")).scalar() == "127.0.0.1/32"
    engine.dispose()


def test_each_postgresql_database_is_new_empty_and_dropped_on_request(postgres_url, tmp_path):
    first, second = database_url_for("postgresql", tmp_path), database_url_for("postgresql", tmp_path)
    assert make_url(first).database != make_url(second).database
    engine = create_db_engine(first)
    with engine.connect() as connection:
        assert connection.execute(text(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")).scalar() == 0
    drop_database_for(first)  # while the engine still holds a connection
    engine.dispose()
    names = {make_url(first).database, make_url(second).database}
    server = create_db_engine(postgres_url)
    with server.connect() as connection:
        existing = set(connection.execute(text("SELECT datname FROM pg_database")).scalars())
    server.dispose()
    assert names & existing == {make_url(second).database}
    drop_database_for(second)


def test_redis_url_is_a_redis_server_on_loopback(redis_url):
    import redis

    assert urlsplit(redis_url).hostname == "127.0.0.1"
    client = redis.Redis.from_url(redis_url)
    assert client.incr("tests:services:counter") == 1
    assert client.config_get("save") == {"save": ""}  # nothing is written to disk
    client.close()


def test_empty_redis_url_forgets_what_earlier_tests_counted(redis_url, empty_redis_url):
    import redis

    assert empty_redis_url == redis_url
    client = redis.Redis.from_url(empty_redis_url)
    assert client.dbsize() == 0
    client.close()
