"""What a pool is made of: one PoolSpec per served model id, read from a YAML or TOML file or from
command-line flags.

A pools file in YAML:

    models:
      - id: mistralai/Mistral-7B-Instruct-v0.3   # the catalog id (or alias) the pool serves
        tokenizer: /models/mistral-7b-instruct    # where the gateway finds the tokenizer
        policy: prefix_affinity                   # or least_outstanding
        max_model_len: 32768
        upstreams:
          - url: http://10.0.0.5:8001/v1          # the upstream's OpenAI base URL
            model: mistral-7b                     # the name the upstream serves it under
            token_env: UPSTREAM_TOKEN             # sent as "Authorization: Bearer …"
          - url: http://10.0.0.6:8080/v1
            name: llama-server-b                  # in metrics and logs (default: host:port)
            health_path: /health

The same in TOML:

    [[models]]
    id = "mistralai/Mistral-7B-Instruct-v0.3"
    tokenizer = "/models/mistral-7b-instruct"
    policy = "prefix_affinity"
    max_model_len = 32768

    [[models.upstreams]]
    url = "http://10.0.0.5:8001/v1"
    model = "mistral-7b"
    token_env = "UPSTREAM_TOKEN"

    [[models.upstreams]]
    url = "http://10.0.0.6:8080/v1"
    name = "llama-server-b"

Every other PoolSpec field may be set per model too (load_factor, health_interval_s, …). A token
is best read from the environment (`token_env`); `token` in the file works too.

On the command line, one flag per upstream: `ID=URL` or `ID=URL,model=NAME,name=NAME,
health_path=/x,token_env=VAR`; flags with the same ID form one pool. A token never goes on the
command line, where other users of the machine can read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
import os
from pathlib import Path
from urllib.parse import urlsplit

import yaml

POLICIES = ("prefix_affinity", "least_outstanding")


@dataclass(frozen=True)
class UpstreamSpec:
    url: str  # the upstream's OpenAI base URL; chat goes to url + "/chat/completions"
    model: str | None = None  # the upstream's own name for the model; None: the served id is sent
    token: str | None = field(default=None, repr=False)  # a secret: in no repr, log or status
    name: str = ""  # in metrics and logs; default: the url's "host:port"
    health_path: str = "/health"  # GET on the url's origin; 200 means healthy

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http or https URL with a host, got {self.url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not hold credentials (they would show in logs): use token or token_env")
        if parts.query or parts.fragment:
            raise ValueError(f"url must be a base URL, without query or fragment, got {self.url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"url has a bad port: {self.url!r}") from None
        if not self.health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/', got {self.health_path!r}")
        if not self.name:
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            object.__setattr__(self, "name", f"{host}:{port}")

    @property
    def chat_url(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"

    @property
    def health_url(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{self.health_path}"


@dataclass(frozen=True)
class PoolSpec:
    model_id: str  # our catalog id (or alias) the pool serves
    upstreams: tuple[UpstreamSpec, ...]  # at least one
    policy: str = "prefix_affinity"  # or "least_outstanding"
    tokenizer: str | None = None  # where the gateway finds the model's tokenizer; carried, not loaded here
    max_model_len: int | None = None  # carried
    load_factor: float = 1.25  # prefix affinity spills past load_factor × the mean load
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 600.0  # between two bytes: a long prompt's first token can take minutes on a CPU
    failure_threshold: int = 3  # consecutive failures that take a member out of rotation
    max_attempts: int = 3  # members tried for one request before its first event, each at most once

    def __post_init__(self):
        object.__setattr__(self, "upstreams", tuple(self.upstreams))
        if not self.model_id:
            raise ValueError("id must not be empty")
        if not self.upstreams:
            raise ValueError("upstreams must list at least one upstream")
        names = [upstream.name for upstream in self.upstreams]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"upstream names must be unique, {', '.join(map(repr, twice))} appears more than "
                             "once: give each upstream a name of its own")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if not self.load_factor > 1:
            raise ValueError(f"load_factor must be greater than 1, got {self.load_factor}")
        for key in ("health_interval_s", "health_timeout_s", "connect_timeout_s", "read_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be greater than 0, got {getattr(self, key)}")
        for key in ("failure_threshold", "max_attempts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")


# the keys a file may set, each with the kind of value it takes
KINDS: dict[str, tuple[type, ...]] = {"a string": (str,), "a number": (int, float), "a whole number": (int,),
                                      "a list": (list,)}
POOL_KEYS = {
    "id": "a string", "upstreams": "a list", "policy": "a string", "tokenizer": "a string",
    "max_model_len": "a whole number", "load_factor": "a number", "health_interval_s": "a number",
    "health_timeout_s": "a number", "connect_timeout_s": "a number", "read_timeout_s": "a number",
    "failure_threshold": "a whole number", "max_attempts": "a whole number",
}
UPSTREAM_KEYS = {key: "a string" for key in ("url", "model", "token", "token_env", "name", "health_path")}
FLAG_KEYS = ("model", "name", "health_path", "token_env")  # a token never goes on a command line


def load_pools_file(path: str | os.PathLike) -> list[PoolSpec]:
    """The pools a YAML (.yaml, .yml) or TOML (.toml) file describes, in its order."""
    path = Path(path)
    document = _read_document(path)
    if not isinstance(document, dict) or set(document) != {"models"}:
        raise ValueError(f"{path}: the file must hold one top-level key, 'models', a list of models")
    models = document["models"]
    if not isinstance(models, list) or not models:
        raise ValueError(f"{path}: 'models' must be a non-empty list")
    pools: list[PoolSpec] = []
    for index, model in enumerate(models):
        where = f"{path}: models[{index}]"
        if not isinstance(model, dict):
            raise ValueError(f"{where}: each model must be a mapping of keys")
        if "id" in model and isinstance(model["id"], str):
            where = f"{path}: model {model['id']!r}"
        pool = _pool_from_mapping(model, where)
        if any(pool.model_id == other.model_id for other in pools):
            raise ValueError(f"{where}: key 'id': the model id appears more than once")
        pools.append(pool)
    return pools


def parse_upstream_flag(text: str, *, token_env: str | None = None) -> tuple[str, UpstreamSpec]:
    """`ID=URL[,model=NAME][,name=NAME][,health_path=/x][,token_env=VAR]` as (id, spec). `token_env`:
    the variable to read a token from when the flag names none."""
    model_id, is_split, rest = text.partition("=")
    model_id = model_id.strip()
    if not is_split or not model_id or not rest.strip():
        raise ValueError(f"upstream {text!r}: expected ID=URL[,model=NAME][,name=NAME][,health_path=/x]"
                         "[,token_env=VAR]")
    where = f"upstream {model_id!r}"
    url, *options = rest.split(",")
    fields: dict[str, str] = {"url": url.strip()}
    for option in options:
        key, is_split, value = (part.strip() for part in option.partition("="))
        if key == "token":
            raise ValueError(f"{where}: a token never goes on the command line (others can read it there): "
                             "use token_env=VAR")
        if key not in FLAG_KEYS:  # named without its value, which may be a mistyped secret
            raise ValueError(f"{where}: unknown option {key!r}; expected one of "
                             f"{', '.join(key + '=' for key in FLAG_KEYS)}")
        if not is_split or not value:
            raise ValueError(f"{where}: option {key!r} needs a value: {key}=...")
        if key in fields:
            raise ValueError(f"{where}: option {key!r} is given twice")
        fields[key] = value
    if token_env and "token_env" not in fields:
        fields["token_env"] = token_env
    return model_id, _upstream_from_mapping(fields, where)


def pools_from_flags(flags: Iterable[str], *, policy: str | None = None,
                     token_env: str | None = None) -> list[PoolSpec]:
    """One pool per model id, in the order the ids first appear, from `--upstream` flags. `policy`:
    every pool's (None: the default); `token_env`: the variable an upstream reads its token from when
    its flag names none."""
    upstreams: dict[str, list[UpstreamSpec]] = {}
    for flag in flags:
        model_id, upstream = parse_upstream_flag(flag, token_env=token_env)
        upstreams.setdefault(model_id, []).append(upstream)
    options = {} if policy is None else {"policy": policy}
    return [_checked(lambda: PoolSpec(model_id, tuple(specs), **options), f"model {model_id!r}")
            for model_id, specs in upstreams.items()]


def _read_document(path: Path):
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
    if suffix == ".toml":
        toml = _toml_module(path)
        try:
            return toml.loads(path.read_text(encoding="utf-8"))
        except toml.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML: {error}") from None
    raise ValueError(f"{path}: a pools file must end in .yaml, .yml or .toml")


def _toml_module(path: Path):
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError(f"{path}: reading TOML needs Python 3.11 or the tomli package: use YAML, or install "
                             "tomli") from None
    return tomllib


def _pool_from_mapping(model: dict, where: str) -> PoolSpec:
    _check_keys(model, POOL_KEYS, where, required=("id", "upstreams"))
    upstreams = []
    for index, upstream in enumerate(model["upstreams"]):
        if not isinstance(upstream, dict):
            raise ValueError(f"{where}: upstreams[{index}]: each upstream must be a mapping of keys")
        upstreams.append(_upstream_from_mapping(upstream, f"{where}: upstreams[{index}]"))
    options = {key: value for key, value in model.items() if key not in ("id", "upstreams")}
    return _checked(lambda: PoolSpec(model["id"], tuple(upstreams), **options), where)


def _upstream_from_mapping(upstream: dict, where: str) -> UpstreamSpec:
    _check_keys(upstream, UPSTREAM_KEYS, where, required=("url",))
    fields = dict(upstream)
    variable = fields.pop("token_env", None)
    if variable is not None:
        if "token" in fields:
            raise ValueError(f"{where}: keys 'token' and 'token_env': give one or the other")
        fields["token"] = os.environ.get(variable)
        if not fields["token"]:
            raise ValueError(f"{where}: key 'token_env': the environment variable {variable} is unset or empty")
    return _checked(lambda: UpstreamSpec(**fields), where)


def _check_keys(mapping: dict, kinds: dict[str, str], where: str, *, required: tuple[str, ...]):
    for key, value in mapping.items():
        if key not in kinds:
            raise ValueError(f"{where}: unknown key {key!r}; expected one of {', '.join(kinds)}")
        # YAML's and TOML's booleans are ints to Python: never a number here
        if isinstance(value, bool) or not isinstance(value, KINDS[kinds[key]]):
            raise ValueError(f"{where}: key {key!r}: expected {kinds[key]}, got {value!r}")
    for key in required:
        if key not in mapping:
            raise ValueError(f"{where}: missing key {key!r}")


def _checked(build: Callable, where: str):
    """What `build` returns, its ValueError told with where the value came from."""
    try:
        return build()
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
