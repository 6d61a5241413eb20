"""What a grammar may cost: bounds on its spec, checked before anything compiles it, and the limits
its compilation runs under.

A grammar is compiled from what a client sends (a JSON schema, the parameters of forced tool calls,
a regex or an EBNF grammar), so its cost is the client's to choose. Measured on the demo model's
vocabulary: a 200-property schema compiles in 0.02 s, a 5,000-value enum in 1.1 s, a 20,000-value
enum in 11 s, and the 60-byte pattern `^([a-z]{1,20}[0-9]{0,30}){1,50}$` in 30 s. Hence two
lines of defence:

1. Bounds on the spec's size and shape (`check_grammar_bounds`), cheap, checked when the request is
   validated. Each refusal names its bound, so a client knows what to change.
2. Limits on the compilation itself, for what no bound can see (a short pattern can still be
   exponential): it runs in a worker process (grammar_worker_pool.py) at a lower priority, under
   an address-space cap and a wall-clock timeout, and is killed when its client leaves.

The schema bounds also bound forced tool calls, whose grammar is a schema made of the tools'
parameters (api/tools.py), and with them the bytes of those tool definitions.
"""

from __future__ import annotations

import json

from mistral_serve.engine.client import GrammarTooLargeError
from mistral_serve.engine.params import GuidedDecoding

# bounds on the spec (names as the refusals give them)
MAX_SCHEMA_BYTES = 64 << 10  # max_schema_bytes: the schema as compact JSON, UTF-8
MAX_SCHEMA_PROPERTIES = 1_000  # max_schema_properties: entries of every `properties` object, together
MAX_SCHEMA_ENUM_ENTRIES = 1_000  # max_schema_enum_entries: values of every `enum`, and each `const`, together
MAX_SCHEMA_DEPTH = 64  # max_schema_depth: how deeply the schema's JSON nests objects and arrays
MAX_REGEX_CHARS = 4 << 10  # max_regex_chars
MAX_GRAMMAR_CHARS = 64 << 10  # max_grammar_chars: an EBNF grammar
# max_tools: tools one request may offer, MAX_TOOLS (defined with the request's other bounds in params.py,
# where the API's request model reads it; checked when the request is parsed)

# limits on compiling (grammar_worker_pool.py)
NUM_GRAMMAR_WORKERS = 2  # per served model: compilations at once
COMPILE_TIMEOUT_S = 10.0  # wall clock, from sending the spec to the worker to its compiled grammar
MAX_COMPILE_MEMORY_BYTES = 1 << 30  # address space a worker may add to what it holds once ready (~0.7 GiB)
MAX_COMPILE_WAIT_S = 10.0  # how long a compilation may wait for a free worker
GRAMMAR_NICENESS = 10  # a worker's, and its loader thread's: the engine's decode comes first
# A compiled grammar can be far bigger to carry than to make: a 200-property schema compiles in
# 0.02 s, but serialises to 28 MB of JSON that takes 0.5 s to read back. So a grammar its worker
# compiled in less CPU time than this is compiled again in the serving process (as cheaply, being
# the same work), and only a costlier one is carried over.
MAX_RECOMPILE_CPU_S = 0.25

# the cache of compiled grammars (grammar_cache.py)
MAX_GRAMMAR_CACHE_BYTES = 512 << 20  # the sum of the compiled grammars' own sizes
MAX_GRAMMAR_CACHE_ENTRIES = 1_024  # grammars and remembered failures


def check_grammar_bounds(guided: GuidedDecoding) -> None:
    """Raise GrammarTooLargeError, naming the bound, for a spec past one of the bounds above."""
    if guided.kind == "json_schema":
        _check_schema(guided.spec)
    elif guided.kind == "regex":
        _check_at_most(len(guided.spec), MAX_REGEX_CHARS, "max_regex_chars", "The regex has {} characters")
    elif guided.kind == "ebnf":
        _check_at_most(len(guided.spec), MAX_GRAMMAR_CHARS, "max_grammar_chars", "The grammar has {} characters")


def _check_schema(spec: str) -> None:
    _check_at_most(len(spec.encode()), MAX_SCHEMA_BYTES, "max_schema_bytes",
                   "The JSON schema takes {} bytes as compact JSON")
    num_properties = num_enum_entries = max_depth = 0
    schema = json.loads(spec)
    pending = [(schema, 1)] if isinstance(schema, dict) else []  # else a boolean schema
    while pending:  # not recursive: the depth is what is being checked
        value, depth = pending.pop()
        max_depth = max(max_depth, depth)
        if isinstance(value, dict):
            if isinstance(value.get("properties"), dict):
                num_properties += len(value["properties"])
            if isinstance(value.get("enum"), list):
                num_enum_entries += len(value["enum"])
            num_enum_entries += "const" in value
            pending.extend((item, depth + 1) for item in value.values() if isinstance(item, (dict, list)))
        else:
            pending.extend((item, depth + 1) for item in value if isinstance(item, (dict, list)))
    _check_at_most(max_depth, MAX_SCHEMA_DEPTH, "max_schema_depth", "The JSON schema nests {} levels deep")
    _check_at_most(num_properties, MAX_SCHEMA_PROPERTIES, "max_schema_properties",
                   "The JSON schema has {} properties in all")
    _check_at_most(num_enum_entries, MAX_SCHEMA_ENUM_ENTRIES, "max_schema_enum_entries",
                   "The JSON schema has {} enum values and consts in all")


def _check_at_most(value: int, limit: int, bound: str, what: str) -> None:
    if value > limit:
        raise GrammarTooLargeError(f"{what.format(f'{value:,}')}; at most {limit:,} are accepted ({bound}).")
