"""Settings: one frozen object, from command-line flags over MISTRAL_SERVE_* variables over defaults.

Built once, in the CLI; everything else receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
import os
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "MISTRAL_SERVE_"
DATABASE_FILE = "mistral-serve.db"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "mistral-serve"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = default_data_dir()
    database_url: str | None = None  # None: the SQLite file DATABASE_FILE in data_dir; or postgresql+psycopg://…
    redis_url: str | None = None  # rate-limit counters shared by replicas (redis://HOST:PORT/DB); None: in process
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "demo"  # a checkpoint path, a Hugging Face id (offline cache) or "demo"
    allow_download: bool = False
    device: str = "auto"  # "auto": CUDA when there, else CPU
    dtype: str = "auto"  # "auto": bfloat16 on CUDA and CPUs with native bfloat16, else float32
    quantize: str | None = None  # None, "int8", "int4" (CPU) or "w8a8" (CPU)
    threads: int | None = None  # CPU threads of the engine; None: $OMP_NUM_THREADS, else every core
    kv_cache_memory_mb: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int | None = None
    # backpressure and faults (README "Limits and failures")
    max_queued_requests: int = 256  # per model, waiting to start; past it: 503 at once
    max_queued_prompt_tokens: int = 262_144  # per model, prompt tokens of the waiting requests
    queue_timeout_s: float = 120.0  # a request not started by then gets a 503
    max_concurrent_requests_per_key: int = 32  # in flight per API key and process; past it: 429
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    database_outage_grace_s: float = 300.0  # a key checked this recently is served while the database is away
    max_usage_backlog_mb: int = 256  # usage rows waiting on disk for the database; past it: 503

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8", "int4", "w8a8"):
            raise ValueError(f"quantize must be 'int8', 'int4', 'w8a8' or unset, got {self.quantize!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.kv_cache_memory_mb < 1:
            raise ValueError("kv_cache_memory_mb must be at least 1")
        for name in ("max_queued_requests", "max_queued_prompt_tokens", "max_concurrent_requests_per_key",
                     "max_usage_backlog_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("queue_timeout_s", "shutdown_timeout_s", "database_outage_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def resolved_database_url(self) -> str:
        """The database every command uses: database_url, else SQLite in data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir.expanduser() / DATABASE_FILE).absolute()}"

    @property
    def usage_spool_dir(self) -> Path:
        """Where usage rows wait on disk for the database (db/usage_spool.py)."""
        return self.data_dir.expanduser() / "usage-spool"

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Defaults, then MISTRAL_SERVE_<FIELD> variables, then explicit overrides (flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _parse(field.name, raw, field.type)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return replace(cls(), **values)


def _parse(name: str, raw: str, annotation: str) -> Any:
    try:
        if "Path" in annotation:
            return Path(raw).expanduser()
        if annotation.startswith("bool"):
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if annotation.startswith("int"):
            return None if raw == "" and "None" in annotation else int(raw)
        if annotation.startswith("float"):
            return float(raw)
        return None if raw == "" and "None" in annotation else raw
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: cannot read {raw!r} as {annotation}") from None
