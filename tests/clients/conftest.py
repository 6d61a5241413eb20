"""One real `mistral-serve serve` process on the tiny random v0.3 checkpoint, shared by every
client-library test here."""

from collections.abc import Iterator

import pytest

from tests.api.servers import V3_MODEL_ID, LiveServer, mistral_serve


@pytest.fixture(scope="package")
def server(tmp_path_factory, tiny_v3) -> Iterator[LiveServer]:
    with mistral_serve(tmp_path_factory.mktemp("clients"), "--model", f"{V3_MODEL_ID}={tiny_v3}",
                       "--kv-cache-memory-mb", "64") as server:
        yield server


@pytest.fixture
def base_url(server) -> str:
    """Where the libraries' OpenAI clients send their requests."""
    return server.url + "/v1"
