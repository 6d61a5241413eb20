"""SamplingParams: how one request wants its tokens chosen and when it wants to stop."""

from __future__ import annotations

from dataclasses import dataclass, field
import json
import math
from typing import Literal

# what the engine accepts; the API's request models take their bounds from here
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_TOOLS = 128  # OpenAI's limit too; with the other grammar bounds in grammar_bounds.py

GuidedKind = Literal["json_object", "json_schema", "regex", "ebnf"]
GUIDED_KINDS = ("json_object", "json_schema", "regex", "ebnf")


@dataclass(frozen=True)
class GuidedDecoding:
    """What the output must match: any JSON object, a JSON Schema, a regular expression or an EBNF
    grammar (xgrammar's GBNF dialect, with a `root` rule).

    `spec` is the schema as JSON text, the regex or the grammar; "" for json_object. A schema is
    stored re-serialised without whitespace, so requests with the same schema share one compiled
    grammar; its key order is kept, since properties are generated in the schema's order.
    """

    kind: GuidedKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise ValueError(f"guided decoding kind must be one of {', '.join(GUIDED_KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"the {self.kind} spec must be a string")
        if self.kind == "json_object":
            if self.spec:
                raise ValueError("json_object takes no spec")
        elif self.kind == "json_schema":
            object.__setattr__(self, "spec", _canonical_schema(self.spec))
        elif not self.spec:
            raise ValueError(f"the {self.kind} spec is empty")

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> GuidedDecoding:
        """From a schema as parsed JSON (a dict or a boolean) or as JSON text."""
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @property
    def schema(self) -> dict | bool | None:
        return json.loads(self.spec) if self.kind == "json_schema" else None


def _canonical_schema(text: str) -> str:
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None: up to the context limit
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens are out
    guided: GuidedDecoding | None = None  # constrained decoding: the output must match this

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, f"n must be between 1 and {MAX_N}, got {self.n}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be at least 1, got {self.max_tokens}")
        check(math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0,
              f"temperature must be between 0 and 2, got {self.temperature}")
        check(math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}")
        check(math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(math.isfinite(value) and -2.0 <= value <= 2.0, f"{name} must be between -2 and 2, got {value}")
        check(math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for token_id, bias in self.logit_bias.items():
            check(isinstance(token_id, int) and token_id >= 0, f"logit_bias: bad token id {token_id!r}")
            check(math.isfinite(bias) and -100.0 <= bias <= 100.0,
                  f"logit_bias values must be between -100 and 100, got {bias}")
        check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
              f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        check(len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        check(self.min_tokens >= 0, f"min_tokens must not be negative, got {self.min_tokens}")
        check(self.guided is None or isinstance(self.guided, GuidedDecoding),
              f"guided must be a GuidedDecoding, got {type(self.guided).__name__}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def num_logprobs(self) -> int | None:
        """None when no logprobs are wanted, else how many alternatives to report."""
        return self.top_logprobs if self.logprobs else None
