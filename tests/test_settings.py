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


def test_hosts_and_proxies_are_comma_separated_and_a_proxy_must_be_an_address(monkeypatch):
    monkeypatch.delenv("MISTRAL_SERVE_ALLOWED_HOSTS", raising=False)
    assert Settings().resolved_allowed_hosts == ("localhost", "127.0.0.1", "::1")
    assert Settings(host="0.0.0.0").resolved_allowed_hosts == ("localhost", "127.0.0.1", "::1")
    assert Settings(host="192.0.2.10").resolved_allowed_hosts == ("localhost", "127.0.0.1", "::1", "192.0.2.10")
    assert Settings().forwarded_allow_ips == ()  # no proxy is believed unless named
    monkeypatch.setenv("MISTRAL_SERVE_ALLOWED_HOSTS", "api.example.com, localhost")
    monkeypatch.setenv("MISTRAL_SERVE_FORWARDED_ALLOW_IPS", "10.0.0.0/8,::1")
    settings = Settings.load({"host": "0.0.0.0"})
    assert settings.resolved_allowed_hosts == ("api.example.com", "localhost")
    assert settings.forwarded_allow_ips == ("10.0.0.0/8", "::1")
    assert Settings.load({"forwarded_allow_ips": "*"}).forwarded_allow_ips == ("*",)
    with pytest.raises(ValueError, match="MISTRAL_SERVE_FORWARDED_ALLOW_IPS") as error:
        Settings.load({"forwarded_allow_ips": "127.0.0.1,proxy.internal"})
    assert "proxy.internal" in str(error.value)
    with pytest.raises(ValueError, match="MISTRAL_SERVE_ALLOWED_HOSTS"):
        Settings.load({"allowed_hosts": " , "})  # a server that answers no one is a typo
