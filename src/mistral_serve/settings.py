"""Settings: one frozen object, from command-line flags over MISTRAL_SERVE_* variables over defaults.

Built once, in the CLI; everything else receives it. pydantic-settings reads the variables when a
Settings is built, never when this module is imported.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mistral_serve.model.precision import DTYPE_CHOICES, QUANTIZATIONS

DATABASE_FILE = "mistral-serve.db"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")
SIGNUP_MODES = ("closed", "invite", "open")  # listening on every interface: no one name to answer to


def _comma_separated(value: Any) -> Any:
    """A flag or variable writes a list as `a,b,c`."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


CommaSeparated = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_separated)]


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "mistral-serve"


class Settings(BaseSettings):
    # an empty variable (MISTRAL_SERVE_THREADS=) counts as unset: the setting keeps its default
    model_config = SettingsConfigDict(env_prefix="MISTRAL_SERVE_", env_ignore_empty=True, frozen=True,
                                      extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None  # None: the SQLite file DATABASE_FILE in data_dir; or postgresql+psycopg://…
    redis_url: str | None = None  # rate-limit counters shared by replicas (redis://HOST:PORT/DB); None: in process
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    model: str = "demo"  # a checkpoint path, a Hugging Face id (offline cache) or "demo"
    allow_download: bool = False
    device: str = "auto"  # "auto": CUDA when there, else CPU
    # "auto": bfloat16 on CUDA and CPUs with native bfloat16, else float32
    dtype: Literal[DTYPE_CHOICES] = "auto"
    quantize: Literal[QUANTIZATIONS] | None = None  # int4 and w8a8: CPU only
    # CPU threads of the engine; None: $OMP_NUM_THREADS, else every core
    threads: int | None = Field(default=None, ge=1)
    kv_cache_memory_mb: int = Field(default=1024, ge=1)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int | None = None
    # backpressure and faults (README "Limits and failures")
    max_queued_requests: int = Field(default=256, ge=1)  # per model, waiting to start; past it: 503 at once
    max_queued_prompt_tokens: int = Field(default=262_144, ge=1)  # per model, prompt tokens of the waiting requests
    queue_timeout_s: float = Field(default=120.0, ge=0)  # a request not started by then gets a 503
    max_concurrent_requests_per_key: int = Field(default=32, ge=1)  # in flight per API key and process; past it: 429
    # in flight per account (all its keys) and process; a plan may set less
    max_concurrent_requests_per_account: int = Field(default=32, ge=1)
    # what one request may make the engine generate: n × max_tokens, and that × (1 + top_logprobs) with logprobs
    max_generated_tokens_per_request: int = Field(default=131_072, ge=1)
    max_logprobs_per_request: int = Field(default=131_072, ge=1)
    shutdown_timeout_s: float = Field(default=30.0, ge=0)  # on SIGTERM, how long in-flight requests may take to finish
    # a key checked this recently is served while the database is away
    database_outage_grace_s: float = Field(default=300.0, ge=0)
    max_usage_backlog_mb: int = Field(default=256, ge=1)  # usage rows waiting on disk for the database; past it: 503
    # who may reach the server (README "Log-ins, hosts and proxies")
    allowed_hosts: CommaSeparated | None = None  # Host header names answered; None: loopback names and `host`
    forwarded_allow_ips: CommaSeparated = ()  # proxies whose X-Forwarded-For/-Proto are believed; "*": any
    # who may open an account from the dashboard (README "Running it for other people");
    # None: "open" while the server listens on loopback only, else "closed"
    signup: Literal[SIGNUP_MODES] | None = None

    @field_validator("allowed_hosts")
    @classmethod
    def _some_host(cls, hosts: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if hosts == ():
            raise ValueError("name at least one host, or * for any")
        return hosts

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses_or_networks(cls, ips: tuple[str, ...]) -> tuple[str, ...]:
        # uvicorn would take a misspelt address as a name that never matches, and trust no one, silently
        for ip in ips:
            if ip != "*":
                try:
                    ipaddress.ip_network(ip, strict=False)
                except ValueError:
                    raise ValueError(f"{ip!r} is not an IP address or network (or *)") from None
        return ips

    @property
    def resolved_database_url(self) -> str:
        """The database every command uses: database_url, else SQLite in data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir.expanduser() / DATABASE_FILE).absolute()}"

    @property
    def resolved_allowed_hosts(self) -> tuple[str, ...]:
        """The Host names answered: allowed_hosts, else the loopback names and `host` when it is one address."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return LOOPBACK_NAMES if self.host in ANY_ADDRESS + LOOPBACK_NAMES else (*LOOPBACK_NAMES, self.host)

    @property
    def signup_mode(self) -> str:
        """`signup`, else open on a loopback address (only this machine can reach it), else closed."""
        if self.signup is not None:
            return self.signup
        return "open" if _is_loopback(self.host) else "closed"

    @property
    def usage_spool_dir(self) -> Path:
        """Where usage rows wait on disk for the database (db/usage_spool.py)."""
        return self.data_dir.expanduser() / "usage-spool"

    @classmethod
    def load(cls, flags: Mapping[str, Any]) -> Settings:
        """Flags over MISTRAL_SERVE_* variables over defaults; a flag that is None was not given.
        A bad value is one line naming the setting, for the command line to print."""
        try:
            return cls(**{name: value for name, value in flags.items() if value is not None})
        except ValidationError as error:
            raise ValueError("; ".join(f"{_setting(e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                                       for e in error.errors())) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _setting(location: tuple) -> str:
    """`port (MISTRAL_SERVE_PORT)`: the flag's name and the variable's, whichever the user set."""
    name = str(location[0])
    return f"{name} ({Settings.model_config['env_prefix']}{name.upper()})"
