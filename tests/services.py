"""Throwaway database servers for the tests: a PostgreSQL cluster and a Redis server of their own, on
free loopback ports, in a temporary folder, gone when the test session ends.

`make test` installs Debian's `postgresql` and `redis-server` packages (scripts/test-services.sh);
here they are only found and started. PostgreSQL refuses to run as root, so as root the cluster
belongs to the `postgres` system user that the package creates."""

from __future__ import annotations

import glob
import os
from pathlib import Path
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20
POSTGRES_SUPERUSER = "postgres"
POSTGRES_SYSTEM_USER = "postgres"  # the owner of the cluster when the tests run as root


class ServiceUnavailable(RuntimeError):
    """A server cannot be started here: its package (or driver) is not installed."""


class ServiceFailed(RuntimeError):
    """A server is installed but did not start: a defect to report, never a reason to skip."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_ready(process: subprocess.Popen, is_ready, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not is_ready():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise ServiceFailed(f"{name} did not start:\n{_tail(log)}")
        time.sleep(0.05)


def stop_process(process: subprocess.Popen, stop_signal: int = signal.SIGTERM,
                 timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Signal the process to stop, and kill it if it has not within `timeout_s`."""
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, num_lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"


class PostgresServer:
    """A PostgreSQL cluster made by `initdb` in a temporary folder: trust authentication, loopback
    only, durability off (nothing here outlives the session). `create_database()` hands out a fresh,
    empty database per test."""

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401  (the driver the URLs name)
        except ImportError:
            raise ServiceUnavailable("psycopg is not installed (`make test` installs the test extra)") from None
        self.bin_dir = find_postgres_bin_dir()
        self.user = _cluster_user()
        self.root = Path(tempfile.mkdtemp(prefix="mistral-serve-postgres-"))
        if self.user is not None:
            shutil.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.port = free_port()
        self.log = self.root / "server.log"
        self.process: subprocess.Popen | None = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _run_as_owner(self, argv: list[str], **kwargs) -> subprocess.Popen:
        owner = {} if self.user is None else {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, **owner, **kwargs)

    def _start(self) -> None:
        data = self.root / "data"
        with open(self.log, "ab") as log:
            initdb = self._run_as_owner(
                [str(self.bin_dir / "initdb"), "--pgdata", str(data), "--username", POSTGRES_SUPERUSER,
                 "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync"],
                stdout=log, stderr=subprocess.STDOUT)
            if initdb.wait() != 0:
                raise ServiceFailed(f"initdb failed:\n{_tail(self.log)}")
        self._run_postgres()

    def _run_postgres(self) -> None:
        data = self.root / "data"
        with open(self.log, "ab") as log:
            self.process = self._run_as_owner(
                [str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT)
        _wait_until_ready(self.process, self._accepts_connections, "PostgreSQL", self.log)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{POSTGRES_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _connect(self):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=POSTGRES_SUPERUSER, dbname="postgres",
                               autocommit=True, connect_timeout=5)

    def _accepts_connections(self) -> bool:
        import psycopg

        try:
            with self._connect() as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def create_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        with self._connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self._connect() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # open connections too

    def pause(self) -> None:
        """Stop the server, keeping its data: an outage, as clients see one."""
        stop_process(self.process, signal.SIGINT)  # PostgreSQL's fast shutdown: clients are disconnected
        self.process = None

    def resume(self) -> None:
        self._run_postgres()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGINT)
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """A `redis-server` on a free loopback port that keeps nothing on disk."""

    def __init__(self) -> None:
        executable = find_redis_server()
        self.root = Path(tempfile.mkdtemp(prefix="mistral-serve-redis-"))
        self.port = free_port()
        self.log = self.root / "server.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [executable, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root),
                 "--save", "", "--appendonly", "no", "--daemonize", "no"],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_ready(self.process, self._answers_ping, "Redis", self.log)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def _command(self, command: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            connection.sendall(command + b"\r\n")
            return connection.recv(64)

    def _answers_ping(self) -> bool:
        try:
            return self._command(b"PING").startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        """Forget every key: counters left by one test never reach the next."""
        reply = self._command(b"FLUSHALL")
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL failed: {reply!r}")

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


def find_postgres_bin_dir() -> Path:
    """The newest PostgreSQL server installed by Debian's packages (/usr/lib/postgresql/<version>/bin)."""
    found = [Path(initdb).parent for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        raise ServiceUnavailable("PostgreSQL is not installed (Debian package `postgresql`; `make test` installs it)")
    return max(found, key=lambda bin_dir: _version_key(bin_dir.parent.name))


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def find_redis_server() -> str:
    executable = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")
    if executable is None:
        raise ServiceUnavailable("redis-server is not installed (Debian package `redis-server`; `make test` installs it)")
    return executable


def _cluster_user() -> pwd.struct_passwd | None:
    """Who owns the cluster: the current user, or (as root, whom PostgreSQL refuses) `postgres`."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        raise ServiceUnavailable(f"running as root and there is no {POSTGRES_SYSTEM_USER!r} user to run "
                                 "PostgreSQL as (Debian's `postgresql` package creates it)") from None
