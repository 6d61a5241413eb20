"""Fixtures for the HTTP API: a tiny random Mistral behind a byte tokenizer, a database with a key,
apps, a live server, and OpenAI's published schemas to check what we send."""

from __future__ import annotations

from pathlib import Path
import shutil
import time

from fastapi.testclient import TestClient
import jsonschema
import pytest
import yaml

from mistral_serve.api.app import create_app
from mistral_serve.api.counters import InProcessCounters
from mistral_serve.api.login_throttle import LoginThrottle
from mistral_serve.db import crud
from mistral_serve.db.migrations import upgrade_to_head
from mistral_serve.db.session import create_db_engine, create_session_factory
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.engine.builder import load_engine, prepare_model
from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.settings import Settings
from mistral_serve.tokenizer import ChatTemplateError
from tests.api.servers import V3_TOKENIZER
from tests.app_server import serving as serve_in_thread
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint
from tests.conftest import database_url_for
from tests.engine.helpers import ByteTokenizer
from tests.model.helpers import mistral_config, reference_and_ours

MODEL_ID = "mistralai/Mistral-7B-Instruct-v0.3"
CONTEXT_LENGTH = 1024
NO_EOS = {"0": -100}  # logit_bias that keeps the byte tokenizer's EOS (id 0) from ending a reply early
OPENAI_SPEC = Path(__file__).with_name("openai-openapi.yaml")


class ChatByteTokenizer(ByteTokenizer):
    """The byte tokenizer with a chat format: "<role>text" per message; a conversation must end with
    a user or tool message, as Mistral's format requires."""

    def encode_chat(self, messages, tools=None):
        if messages[-1]["role"] not in ("user", "tool"):
            raise ChatTemplateError("the last message must be from the user or a tool")
        return self.encode("".join(f"<{m['role']}>{_text(m.get('content'))}" for m in messages))


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny model, prepared for inference: what an engine takes."""
    return prepare_model(reference_and_ours(mistral_config(max_position_embeddings=CONTEXT_LENGTH, vocab_size=256))[1])


@pytest.fixture(scope="session")
def make_engine(tiny_model):
    def make() -> LLMEngine:
        return LLMEngine(tiny_model, ChatByteTokenizer(), EngineConfig(block_size=16, num_kv_blocks=128, seed=0))
    return make


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


def pytest_generate_tests(metafunc):
    if "api_db_backend" in metafunc.fixturenames:
        metafunc.parametrize("api_db_backend", getattr(metafunc.module, "API_DB_BACKENDS", ["sqlite"]),
                             scope="module")


@pytest.fixture(scope="module")
def api_db(tmp_path_factory, api_db_backend):
    """A session factory on a migrated database of this module's own: SQLite, or each of the
    backends a module names in its API_DB_BACKENDS (the storage-heavy HTTP tests name both)."""
    url = database_url_for(api_db_backend, tmp_path_factory.mktemp("db"))
    upgrade_to_head(url)
    engine = create_db_engine(url)
    yield create_session_factory(engine)
    engine.dispose()


def new_key(db, email: str = "tests@example.com", name: str = "tests") -> str:
    """A new key of the account `email` (created if new): the raw secret."""
    with db() as session:
        account = crud.get_account_by_email(session, email) or crud.create_account(session, email, password=None)
        return crud.create_api_key(session, account, name)[1]


@pytest.fixture(scope="module")
def api_key(api_db) -> str:
    return new_key(api_db)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def app(engine, api_db, tmp_path_factory):
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(engine)}, api_db)


@pytest.fixture(scope="module")
def client(app, api_key):
    """A client that sends a valid key with every request."""
    with TestClient(app, headers=bearer(api_key)) as client:
        yield client


def serving(app, *, is_started: bool = False):
    """`app` under a real uvicorn on a free loopback port, in a thread: yields its base URL. As `serve`
    runs it by default, X-Forwarded-* headers are believed from no one. `is_started`: the app runs
    already (in a TestClient): serve it as it is, without starting or stopping it again."""
    return serve_in_thread(app, log_level="warning", proxy_headers=False, lifespan="off" if is_started else "auto")


@pytest.fixture(scope="module")
def live_url(app):
    """The app under a real uvicorn on a free loopback port."""
    with serving(app) as url:
        yield url


def chat(**fields) -> dict:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}]}
    body.update(fields)
    return body


def sse_events(text: str) -> list:
    """The data of each event; "[DONE]" stays a string."""
    import json

    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block.strip()]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# OpenAI's schemas (OpenAPI 3.x: `nullable: true` becomes a union with null for JSON Schema)

def _without_nullable(node):
    if isinstance(node, list):
        return [_without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _without_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="session")
def openai_schema():
    """validate(name, instance): raise unless `instance` is a valid components.schemas[name]."""
    with OPENAI_SPEC.open() as file:
        spec = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    components = _without_nullable(spec["components"])
    validators = {}

    def validate(name: str, instance) -> None:
        if name not in validators:
            validators[name] = jsonschema.Draft202012Validator(
                {"$ref": f"#/components/schemas/{name}", "components": components})
        validators[name].validate(instance)
    return validate


# a tiny random checkpoint in v0.3's format, with Mistral's real v3 tokenizer (tool calls, grammars)

@pytest.fixture(scope="module")
def v3_engine(tmp_path_factory):
    config = tiny_mistral_config(vocab_size=32768, max_position_embeddings=1024)
    path, _ = write_hf_checkpoint(tmp_path_factory.mktemp("v3"), config)
    shutil.copy(V3_TOKENIZER, path / "tokenizer.model.v3")
    return load_engine(str(path), config=EngineConfig(block_size=16, num_kv_blocks=256, max_num_seqs=16))


@pytest.fixture(scope="module")
def v3_client(v3_engine, api_db, tmp_path_factory, api_key):
    with TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(v3_engine)}, api_db),
                    headers=bearer(api_key)) as client:
        yield client


@pytest.fixture(scope="module")
def closers(v3_engine):
    """logit_bias that makes a random model likely to close strings and objects; only the grammar
    makes the output valid."""
    vocab = v3_engine.tokenizer.grammar_vocab()
    bias = {b'"': 10.0, b"}": 4.0, b"]": 4.0}
    return {str(i): bias[piece] for i, piece in enumerate(vocab) if piece in bias}


@pytest.fixture
def fresh_throttle(app):
    """No failed log-ins counted yet: a module's tests all log in from the same address."""
    app.state.login_throttle = LoginThrottle(InProcessCounters())
