"""Pools from files and flags, and the errors a mistaken one gets: each names the file, the model and
the key."""

import re

import pytest

from mistral_serve.upstream import config
from mistral_serve.upstream.config import (
    PoolSpec, UpstreamSpec, load_pools_file, parse_upstream_flag, pools_from_flags,
)

MISTRAL = "mistralai/Mistral-7B-Instruct-v0.3"


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def documented_example(language: str) -> str:
    """The module docstring's example in `language`, dedented."""
    blocks = re.split(r"\n(?=The same in TOML:|Every other)", config.__doc__)
    block = next(block for block in blocks if ("[[models]]" in block) == (language == "toml"))
    lines = [line[4:] for line in block.splitlines() if line.startswith("    ")]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_the_documented_examples_load(tmp_path, monkeypatch, suffix):
    monkeypatch.setenv("UPSTREAM_TOKEN", "s3cret")
    path = write(tmp_path, "pools" + suffix, documented_example("toml" if suffix == ".toml" else "yaml"))
    [pool] = load_pools_file(path)
    assert pool.model_id == MISTRAL
    assert (pool.tokenizer, pool.policy, pool.max_model_len) == ("/models/mistral-7b-instruct", "prefix_affinity",
                                                                 32768)
    first, second = pool.upstreams
    assert (first.url, first.model, first.token, first.name) == ("http://10.0.0.5:8001/v1", "mistral-7b", "s3cret",
                                                                 "10.0.0.5:8001")
    assert (second.name, second.token, second.model, second.health_path) == ("llama-server-b", None, None, "/health")


def test_a_yaml_file_sets_every_option(tmp_path, monkeypatch):
    path = write(tmp_path, "pools.yml", """
models:
  - id: a
    policy: least_outstanding
    load_factor: 2
    health_interval_s: 0.5
    health_timeout_s: 1
    connect_timeout_s: 1.5
    read_timeout_s: 30
    failure_threshold: 5
    max_attempts: 2
    upstreams:
      - {url: "https://gpu.example.com/v1", token: t, health_path: /healthz}
  - id: b
    upstreams:
      - url: http://[::1]:9000/v1
""")
    a, b = load_pools_file(path)
    assert a == PoolSpec("a", (UpstreamSpec("https://gpu.example.com/v1", token="t", health_path="/healthz"),),
                         policy="least_outstanding", load_factor=2, health_interval_s=0.5, health_timeout_s=1,
                         connect_timeout_s=1.5, read_timeout_s=30, failure_threshold=5, max_attempts=2)
    assert a.upstreams[0].name == "gpu.example.com:443"
    assert a.upstreams[0].chat_url == "https://gpu.example.com/v1/chat/completions"
    assert a.upstreams[0].health_url == "https://gpu.example.com/healthz"
    assert b.upstreams[0].name == "[::1]:9000" and b.policy == "prefix_affinity"


def test_the_token_stays_out_of_every_repr(tmp_path):
    path = write(tmp_path, "pools.yaml",
                 "models:\n  - id: a\n    upstreams:\n      - {url: 'http://h:1/v1', token: s3cret}\n")
    [pool] = load_pools_file(path)
    assert pool.upstreams[0].token == "s3cret"
    assert "s3cret" not in repr(pool) and "s3cret" not in str(pool.upstreams[0])


YAML_MISTAKES = [
    ("models: []\n", "'models' must be a non-empty list"),
    ("servers: []\n", "one top-level key, 'models'"),
    ("models:\n  - id: a\n", "model 'a': missing key 'upstreams'"),
    ("models:\n  - upstreams: [{url: 'http://h:1'}]\n", r"models\[0\]: missing key 'id'"),
    ("models:\n  - id: a\n    upstreams: []\n", "model 'a': upstreams must list at least one upstream"),
    ("models:\n  - id: a\n    colour: red\n    upstreams: [{url: 'http://h:1'}]\n", "model 'a': unknown key 'colour'"),
    ("models:\n  - id: a\n    load_factor: high\n    upstreams: [{url: 'http://h:1'}]\n",
     "model 'a': key 'load_factor': expected a number, got 'high'"),
    ("models:\n  - id: a\n    max_attempts: true\n    upstreams: [{url: 'http://h:1'}]\n",
     "model 'a': key 'max_attempts': expected a whole number, got True"),
    ("models:\n  - id: a\n    max_attempts: 1.5\n    upstreams: [{url: 'http://h:1'}]\n",
     "model 'a': key 'max_attempts': expected a whole number"),
    ("models:\n  - id: a\n    max_attempts: 0\n    upstreams: [{url: 'http://h:1'}]\n",
     "model 'a': max_attempts must be at least 1, got 0"),
    ("models:\n  - id: a\n    load_factor: 1\n    upstreams: [{url: 'http://h:1'}]\n",
     "model 'a': load_factor must be greater than 1, got 1"),
    ("models:\n  - id: a\n    health_interval_s: 0\n    upstreams: [{url: 'http://h:1'}]\n",
     "model 'a': health_interval_s must be greater than 0"),
    ("models:\n  - id: a\n    policy: random\n    upstreams: [{url: 'http://h:1'}]\n",
     "model 'a': policy must be one of prefix_affinity, least_outstanding, got 'random'"),
    ("models:\n  - id: a\n    upstreams: [{url: 'ftp://h:1'}]\n",
     r"model 'a': upstreams\[0\]: url must be an http or https URL with a host, got 'ftp://h:1'"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http:///v1'}]\n", r"upstreams\[0\]: url must be an http or https URL"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://u:p@h:1/v1'}]\n",
     r"upstreams\[0\]: url must not hold credentials"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://h:1/v1?x=1'}]\n", "url must be a base URL"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://h:99999/v1'}]\n", "url has a bad port"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://h:1', health_path: health}]\n",
     "health_path must start with '/'"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://h:1', nmae: x}]\n", r"upstreams\[0\]: unknown key 'nmae'"),
    ("models:\n  - id: a\n    upstreams: [{url: 8}]\n", r"upstreams\[0\]: key 'url': expected a string, got 8"),
    ("models:\n  - id: a\n    upstreams: [{model: x}]\n", r"upstreams\[0\]: missing key 'url'"),
    ("models:\n  - id: a\n    upstreams: ['http://h:1']\n", r"upstreams\[0\]: each upstream must be a mapping"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://h:1/v1'}, {url: 'http://h:1/v2'}]\n",
     "model 'a': upstream names must be unique, 'h:1' appears more than once"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://h:1'}]\n  - id: a\n    upstreams: [{url: 'http://h:2'}]\n",
     "model 'a': key 'id': the model id appears more than once"),
    ("models:\n  - id: a\n    upstreams: [{url: 'http://h:1', token: t, token_env: T}]\n",
     "keys 'token' and 'token_env': give one or the other"),
    ("models: [\n", "not valid YAML"),
]
TOML_MISTAKES = [
    ("[[models]]\nid = 'a'\nupstreams = [{url = 'http://h:1', retries = 2}]\n",
     r"upstreams\[0\]: unknown key 'retries'"),
    ("[[models]]\nid = 'a'\nread_timeout_s = 'long'\nupstreams = [{url = 'http://h:1'}]\n",
     "model 'a': key 'read_timeout_s': expected a number"),
    ("[[models]\n", "not valid TOML"),
]


@pytest.mark.parametrize("name, text, message", [("pools.yaml", *mistake) for mistake in YAML_MISTAKES]
                         + [("pools.toml", *mistake) for mistake in TOML_MISTAKES])
def test_a_mistaken_file_is_refused_with_its_place(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError, match=message) as refusal:
        load_pools_file(path)
    assert str(refusal.value).startswith(f"{path}: ")


def test_an_unset_token_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    path = write(tmp_path, "pools.yaml",
                 "models:\n  - id: a\n    upstreams: [{url: 'http://h:1', token_env: NO_SUCH_TOKEN}]\n")
    with pytest.raises(ValueError, match=r"model 'a': upstreams\[0\]: key 'token_env': the environment variable "
                                         "NO_SUCH_TOKEN is unset or empty"):
        load_pools_file(path)


def test_a_file_of_another_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"pools.json: a pools file must end in .yaml, .yml or .toml"):
        load_pools_file(write(tmp_path, "pools.json", "{}"))


def test_flags_group_upstreams_by_model_id(monkeypatch):
    monkeypatch.setenv("POOL_TOKEN", "from-env")
    monkeypatch.setenv("B_TOKEN", "b-only")
    a, b = pools_from_flags(["a=http://h:1/v1", "b=http://h:3/v1,token_env=B_TOKEN",
                             "a=http://h:2/v1, model=mistral-7b ,name=second,health_path=/ready"],
                            policy="least_outstanding", token_env="POOL_TOKEN")
    assert (a.model_id, b.model_id) == ("a", "b")
    assert a.policy == b.policy == "least_outstanding"
    assert a.upstreams == (UpstreamSpec("http://h:1/v1", token="from-env"),
                           UpstreamSpec("http://h:2/v1", model="mistral-7b", name="second", health_path="/ready",
                                        token="from-env"))
    assert b.upstreams[0].token == "b-only"


def test_flags_keep_the_default_policy_and_send_no_token_unless_asked():
    [pool] = pools_from_flags(["a=http://h:1/v1"])
    assert pool.policy == "prefix_affinity" and pool.upstreams[0].token is None
    assert parse_upstream_flag("m=http://h:1/v1") == ("m", UpstreamSpec("http://h:1/v1"))


@pytest.mark.parametrize("flag, message", [
    ("http://h:1/v1", "upstream 'http://h:1/v1': expected ID=URL"),
    ("=http://h:1/v1", "expected ID=URL"),
    ("a=", "expected ID=URL"),
    ("a=http://h:1/v1,token=s3cret", "upstream 'a': a token never goes on the command line"),
    ("a=http://h:1/v1,colour=red", "upstream 'a': unknown option 'colour'; expected one of model=, name="),
    ("a=http://h:1/v1,model", "upstream 'a': option 'model' needs a value"),
    ("a=http://h:1/v1,model=x,model=y", "upstream 'a': option 'model' is given twice"),
    ("a=h:1/v1", "upstream 'a': url must be an http or https URL with a host"),
    ("a=http://h:1/v1,token_env=NO_SUCH_TOKEN",
     "upstream 'a': key 'token_env': the environment variable NO_SUCH_TOKEN"),
])
def test_a_mistaken_flag_is_refused(flag, message, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ValueError, match=message):
        parse_upstream_flag(flag)


def test_a_mistyped_option_is_named_without_its_value():
    with pytest.raises(ValueError, match="unknown option 'tokn'") as refusal:
        parse_upstream_flag("a=http://h:1/v1,tokn=s3cret")
    assert "s3cret" not in str(refusal.value)


def test_flags_of_one_model_need_names_of_their_own():
    with pytest.raises(ValueError, match="model 'a': upstream names must be unique, 'h:1' appears more than once"):
        pools_from_flags(["a=http://h:1/v1", "a=http://h:1/v2"])
    with pytest.raises(ValueError, match="model 'a': policy must be one of"):
        pools_from_flags(["a=http://h:1/v1"], policy="fastest")
