"""`mistral-serve serve` with a checkpoint it cannot load: one clear line and exit code 2, no traceback."""

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


def test_the_engine_leaves_a_core_to_the_http_server_unless_told_otherwise(monkeypatch):
    from mistral_serve.engine import builder

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(builder, "available_cores", lambda: 8)
    assert builder.resolve_threads(None, shares_with_server=True) == 7
    assert builder.resolve_threads(None, shares_with_server=False) == 8
    assert builder.resolve_threads(3, shares_with_server=True) == 3
    monkeypatch.setattr(builder, "available_cores", lambda: 1)
    assert builder.resolve_threads(None, shares_with_server=True) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert builder.resolve_threads(None, shares_with_server=True) == 2
