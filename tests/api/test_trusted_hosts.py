"""The Host check: by default the server answers loopback names and its --host address, so a web page
that rebinds its own name to 127.0.0.1 cannot drive it; --allowed-hosts names others, or "*" any."""

from __future__ import annotations

from fastapi.testclient import TestClient
import pytest

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID


@pytest.fixture(scope="module")
def served_to(engine, api_db, tmp_path_factory):
    """served_to(host_header, **settings): the reply to GET /health sent with `Host: host_header`."""
    def status(host_header: str, **settings):
        app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data"), **settings),
                         {MODEL_ID: AsyncEngine(engine)}, api_db)
        return TestClient(app).get("/health", headers={"Host": host_header})
    return status


def test_by_default_loopback_names_are_answered_on_any_port(served_to):
    for host in ("localhost", "localhost:8000", "LocalHost.", "127.0.0.1:8000", "[::1]:8000", "[::1]"):
        assert served_to(host, allowed_hosts=None).status_code == 200, host


@pytest.mark.parametrize("host", ["rebound.example", "rebound.example:8000", "localhost.rebound.example",
                                  "127.0.0.1.nip.example", "", "[::2]"])
def test_another_host_gets_a_400_that_names_the_setting(served_to, host):
    response = served_to(host, allowed_hosts=None)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "host_not_allowed")
    assert "--allowed-hosts" in error["message"] and "MISTRAL_SERVE_ALLOWED_HOSTS" in error["message"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_host_address_is_answered_when_it_is_one_address(served_to):
    assert served_to("192.0.2.10:8000", allowed_hosts=None, host="192.0.2.10").status_code == 200
    assert served_to("192.0.2.10:8000", allowed_hosts=None, host="0.0.0.0").status_code == 400
    assert served_to("192.0.2.10:8000", allowed_hosts=None, host="::").status_code == 400


def test_allowed_hosts_replace_the_default_and_a_star_allows_any(served_to):
    named = {"allowed_hosts": "api.example.com, [::1]"}
    assert served_to("api.example.com:443", **named).status_code == 200
    assert served_to("[::1]:8000", **named).status_code == 200
    assert served_to("localhost", **named).status_code == 400
    assert served_to("anything.example", allowed_hosts="*").status_code == 200
