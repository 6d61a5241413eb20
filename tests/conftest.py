"""Fixtures shared across the test tree."""

import os

import pytest

from mistral_serve.model.loader import CheckpointError, find_demo_gguf


@pytest.fixture(scope="session")
def demo_path():
    """The demo model's GGUF file. `make test` installs it; where it is missing the demo tests are
    skipped, except in CI, where a missing install step must fail the run rather than hide."""
    try:
        return find_demo_gguf()
    except CheckpointError as error:
        if os.environ.get("CI"):
            pytest.fail(f"demo model not installed: {error}")
        pytest.skip(f"demo model not installed: {error}")
