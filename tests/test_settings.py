"""Settings: flags over MISTRAL_SERVE_* variables over defaults, read when built, frozen."""

from pathlib import Path

import pydantic
import pytest

from mistral_serve.settings import Settings


def test_the_default_data_dir_follows_the_environment_of_when_settings_are_built(tmp_path, monkeypatch):
    monkeypatch.delenv("MISTRAL_SERVE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings().data_dir == tmp_path / "mistral-serve"


def test_flags_win_over_variables_and_variables_over_defaults(monkeypatch):
    monkeypatch.setenv("MISTRAL_SERVE_PORT", "9001")
    monkeypatch.setenv("MISTRAL_SERVE_ALLOW_DOWNLOAD", "yes")
    monkeypatch.setenv("MISTRAL_SERVE_THREADS", "")  # empty: unset
    settings = Settings.load({"port": None, "host": "0.0.0.0", "data_dir": Path("flag")})
    assert (settings.port, settings.host, settings.allow_download, settings.threads) == (9001, "0.0.0.0", True, None)
    assert Settings.load({"port": 9002}).port == 9002
    assert Settings().max_num_seqs == 64


def test_a_bad_value_is_one_line_that_names_the_variable(monkeypatch):
    monkeypatch.setenv("MISTRAL_SERVE_QUANTIZE", "int3")
    with pytest.raises(ValueError) as error:
        Settings.load({})
    assert "MISTRAL_SERVE_QUANTIZE" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="MISTRAL_SERVE_PORT"):
        Settings.load({"quantize": "int8", "port": 70000})


def test_settings_are_frozen():
    with pytest.raises(pydantic.ValidationError):
        Settings().port = 1
