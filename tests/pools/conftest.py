"""The pool tests validate replies against OpenAI's document as the API tests do. The vLLM tests run
only when asked for (`pytest -m vllm`): they need vLLM's CPU build (scripts/vllm-upstream.sh, about
700 MB of downloads) and two of its servers (about 4 GB of memory each)."""

import pytest

from tests.api.conftest import openai_schema  # noqa: F401 (a fixture)


def pytest_collection_modifyitems(config, items):
    if "vllm" in (config.getoption("markexpr") or ""):
        return
    opt_in = pytest.mark.skip(reason="opt-in: scripts/vllm-upstream.sh, then pytest -m vllm")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(opt_in)
