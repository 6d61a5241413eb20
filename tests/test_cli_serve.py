"""`mistral-serve serve` with a checkpoint it cannot load: one clear line and exit code 2, no traceback."""

import logging
import os
import subprocess

import pytest

from tests.api.servers import CLI
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint


def serve(tmp_path, model_path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "serve", "--model", f"broken={model_path}", "--port", "1",
                           "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=300)


def corrupt_weights(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path / "checkpoint", tiny_mistral_config())
    weights = next(path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a failed download
    return path


def missing(tmp_path):
    return tmp_path / "no-such-checkpoint"


@pytest.mark.parametrize("make_checkpoint", [missing, corrupt_weights])
def test_a_checkpoint_that_cannot_be_loaded_is_one_clear_error_and_exit_code_2(tmp_path, make_checkpoint):
    checkpoint = make_checkpoint(tmp_path)
    done = serve(tmp_path, checkpoint)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("mistral-serve: error: ") and str(checkpoint) in last_line


def test_the_engine_takes_every_core_unless_told_otherwise(monkeypatch):
    from mistral_serve.engine import builder

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(builder, "available_cores", lambda: 8)
    assert builder.resolve_threads(None) == 8
    assert builder.resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert builder.resolve_threads(None) == 2


def test_serve_warns_when_it_listens_everywhere_but_answers_loopback_names_only(caplog):
    from mistral_serve.cli import may_warn_of_refused_hosts
    from mistral_serve.settings import Settings

    with caplog.at_level(logging.WARNING):
        may_warn_of_refused_hosts(Settings(host="0.0.0.0", allowed_hosts=None))
        [warning] = caplog.records
        assert "--allowed-hosts" in warning.getMessage() and "0.0.0.0" in warning.getMessage()
        caplog.clear()
        for quiet in (Settings(host="127.0.0.1", allowed_hosts=None), Settings(host="192.0.2.10", allowed_hosts=None),
                      Settings(host="::", allowed_hosts="api.example.com")):
            may_warn_of_refused_hosts(quiet)
        assert caplog.records == []


def run_cli(tmp_path, *args: str, environ: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("MISTRAL_SERVE_")}, **(environ or {})}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environ)


def test_an_engine_off_loopback_without_a_token_refuses_to_start(tmp_path):
    done = run_cli(tmp_path, "engine", "--host", "0.0.0.0", "--port", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "needs a token" in done.stderr and "MISTRAL_SERVE_ENGINE_TOKEN" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--upstream", "x=ftp://host/v1"], "http or https"),
    (["--upstream", "x=http://h:1/v1,token=secret"], "token"),
    (["--pools-file", "pools.json"], ".yaml, .yml or .toml"),
    (["--upstream", "mistralai/Mistral-7B-Instruct-v0.1=http://h:1/v1"], "name its tokenizer"),
])
def test_a_bad_pool_is_one_clear_error(tmp_path, flags, message):
    (tmp_path / "pools.json").write_text("{}")
    done = run_cli(tmp_path, "serve", *flags, "--port", "1", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    assert "secret" not in done.stderr  # a mistyped token is never echoed
