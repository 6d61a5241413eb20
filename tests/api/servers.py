"""Real `mistral-serve` processes for end-to-end tests, and the tiny Mistral v0.3 checkpoint they serve.

A server is started exactly as a user starts one (`mistral-serve serve …` in a subprocess), with its
own data directory, its own Hugging Face cache and a key made by `mistral-serve keys create`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import time

import httpx
import mistral_common

from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint
from tests.services import stop_process

V3_MODEL_ID = "mistralai/Mistral-7B-Instruct-v0.3"
V3_VOCAB_SIZE = 32768
TINY_CONTEXT_LENGTH = 512  # small, so a reply without max_tokens ends quickly
V3_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
CLI = str(Path(sys.executable).with_name("mistral-serve"))
START_TIMEOUT_S = 300


def write_tiny_v3_checkpoint(directory: Path) -> Path:
    """A random 2-layer Mistral in Hugging Face format, with Mistral's real v3 tokenizer."""
    path, _ = write_hf_checkpoint(directory, tiny_mistral_config(
        vocab_size=V3_VOCAB_SIZE, max_position_embeddings=TINY_CONTEXT_LENGTH))
    shutil.copyfile(V3_TOKENIZER, path / "tokenizer.model.v3")
    return path


def put_in_hf_cache(cache_dir: Path, repo_id: str, checkpoint: Path) -> Path:
    """Place `checkpoint` in a Hugging Face cache as `repo_id`, in the layout huggingface_hub documents."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@dataclass(frozen=True)
class LiveServer:
    url: str  # http://127.0.0.1:PORT, the base of both API styles
    key: str
    process: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(hf_cache: Path | None, settings: dict[str, str]) -> dict[str, str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("MISTRAL_SERVE_")}
    if hf_cache is not None:
        environ.update(HF_HUB_CACHE=str(hf_cache), HF_HUB_OFFLINE="1")
    environ.update({f"MISTRAL_SERVE_{name.upper()}": value for name, value in settings.items()})
    return environ


def create_key(data_dir: Path, environ: dict[str, str] | None = None, *flags: str, email: str = "e2e@example.com",
               name: str = "e2e") -> str:
    """`mistral-serve keys create … *flags` as a user runs it; the raw key it prints. `environ`: the
    command's environment (default: this one without MISTRAL_SERVE_* variables)."""
    environ = environ if environ is not None else _environment(None, {})
    done = subprocess.run([CLI, "keys", "create", "--email", email, "--name", name, *flags,
                           "--data-dir", str(data_dir)], capture_output=True, text=True, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@contextmanager
def mistral_serve(work_dir: Path, *serve_args: str, hf_cache: Path | None = None,
                  settings: dict[str, str] | None = None, key: str | None = None,
                  log_name: str = "server.log") -> Iterator[LiveServer]:
    """`mistral-serve serve *serve_args` on a free port, with the data directory work_dir/data, ready to
    answer; stopped on exit. `settings` become MISTRAL_SERVE_* variables; no other MISTRAL_SERVE_*
    variable reaches the server. `key`: one made already in that data directory (default: a new one).
    Everything the server prints goes to work_dir/`log_name`."""
    data_dir = work_dir / "data"
    hf_cache = hf_cache or work_dir / "empty-hf-cache"
    hf_cache.mkdir(parents=True, exist_ok=True)
    environ = _environment(hf_cache, settings or {})
    key = key or create_key(data_dir, environ)
    port = _free_port()
    log_path = work_dir / log_name
    log = log_path.open("w")
    process = subprocess.Popen([CLI, "serve", "--port", str(port), "--data-dir", str(data_dir), *serve_args],
                               stdout=log, stderr=subprocess.STDOUT, env=environ)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_path)
        yield LiveServer(url, key, process)
    finally:
        stop_process(process, timeout_s=30)
        log.close()


def away_from_window_end(window_s: int, margin_s: float = 15) -> None:
    """Fixed windows (per minute, per 15 minutes) are aligned to the clock: start well inside one."""
    left = window_s - time.time() % window_s
    if left < margin_s:
        time.sleep(left + 0.5)


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, path: str = "/ready") -> None:
    """Until GET url+path answers 200; an AssertionError with the log's tail if the process exits first
    or START_TIMEOUT_S passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mistral-serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"mistral-serve was not ready in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
