"""Constrained decoding: a request's GuidedDecoding compiled into a grammar, once per spec.

The grammar engine is xgrammar. Its view of the vocabulary is the tokenizer's own
(`ChatTokenizer.grammar_vocab`: each token's exact output bytes, special tokens never allowed),
sized to the model's vocabulary so padding ids are never allowed either; its stop tokens are the
tokenizer's EOS ids, which it allows only where the grammar may end.

Each sequence gets its own `GrammarMatcher` over the shared compiled grammar: the runner asks it
for a token bitmask before sampling and feeds it the sampled token after.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import os
import re
import threading

import xgrammar as xgr

from mistral_serve.engine.params import GuidedDecoding

__all__ = ["GrammarCompilerCache", "GrammarMatcher", "allocate_token_bitmask", "check_schema_support"]

GrammarMatcher = xgr.GrammarMatcher
allocate_token_bitmask = xgr.allocate_token_bitmask

# xgrammar's errors start with "[hh:mm:ss] source.cc:line: "
_ERROR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


@dataclass
class _Entry:
    """A compilation, done or in progress (another thread may be compiling it)."""

    is_done: threading.Event = field(default_factory=threading.Event)
    grammar: xgr.CompiledGrammar | None = None
    error: ValueError | None = None


class GrammarCompilerCache:
    """Compiles each distinct GuidedDecoding once, for one tokenizer and model vocabulary.

    Thread-safe: callers' threads compile (so a bad schema fails before it is queued), the engine
    thread finds the result here. Two threads asking for the same spec share one compilation; a
    thread never waits on another spec's. The least recently used grammars are dropped past
    `max_entries`; failures are remembered too, so a bad spec sent again fails at once.
    """

    def __init__(self, tokenizer, vocab_size: int, *, max_entries: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: the width of its logits
        self.max_entries = max_entries
        self.num_compilations = 0
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._entries: OrderedDict[GuidedDecoding, _Entry] = OrderedDict()

    def compile(self, guided: GuidedDecoding) -> xgr.CompiledGrammar:
        """The compiled grammar; ValueError (naming the problem) when it cannot be honoured."""
        with self._lock:
            entry = self._entries.get(guided)
            is_owner = entry is None
            if is_owner:
                entry = self._entries[guided] = _Entry()
                self.num_compilations += 1
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(guided)
        if is_owner:
            try:
                entry.grammar = self._compile(guided)
            except ValueError as error:
                entry.error = error
            finally:
                entry.is_done.set()
        entry.is_done.wait()
        if entry.error is not None:
            raise ValueError(str(entry.error))
        return entry.grammar

    def matcher(self, guided: GuidedDecoding) -> GrammarMatcher:
        """A fresh matcher, at the start of the grammar, for one sequence."""
        return GrammarMatcher(self.compile(guided))

    def _compile(self, guided: GuidedDecoding) -> xgr.CompiledGrammar:
        if guided.kind == "json_schema":
            check_schema_support(guided.schema)
        compiler = self._get_compiler()
        try:
            # compact output: free whitespace would let a model pad forever instead of closing
            if guided.kind == "json_object":  # any object (the built-in JSON grammar allows any value)
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if guided.kind == "json_schema":  # strict: no properties beyond the schema's
                return compiler.compile_json_schema(guided.spec, any_whitespace=False, strict_mode=True)
            if guided.kind == "regex":
                return compiler.compile_regex(guided.spec)
            return compiler.compile_grammar(guided.spec)
        except (RuntimeError, ValueError) as error:
            reason = _ERROR_PREFIX.sub("", str(error)).strip()
            raise ValueError(f"cannot constrain the output to this {_NAMES[guided.kind]}: {reason}") from error

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo(self.tokenizer.grammar_vocab(), xgr.VocabType.RAW,
                                         vocab_size=self.vocab_size,
                                         stop_token_ids=sorted(self.tokenizer.eos_token_ids))
                # our cache, not xgrammar's, decides what stays compiled
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                     cache_enabled=False)
            return self._compiler


_NAMES = {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex", "ebnf": "grammar"}

# JSON Schema keywords the grammar engine accepts but does not enforce: output would not validate
_UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas",
                         "contains", "minContains", "maxContains", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "additionalItems")


def check_schema_support(schema, path: str = "#") -> None:
    """Raise ValueError naming the first keyword this schema uses that the grammar cannot enforce."""
    if not isinstance(schema, dict):
        return

    def unsupported(keyword: str, detail: str = "") -> ValueError:
        return ValueError(f"JSON schema keyword {keyword!r} (at {path}) is not supported for constrained "
                          f"decoding{detail}")

    for keyword in _UNSUPPORTED_KEYWORDS:
        if keyword in schema:
            raise unsupported(keyword)
    if schema.get("uniqueItems") is True:
        raise unsupported("uniqueItems")
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise unsupported("allOf", " with more than one schema")
    if "multipleOf" in schema and schema.get("type") != "integer":
        raise unsupported("multipleOf", " except on integers")
    for keyword in _SCHEMA_MAPS:
        if isinstance(schema.get(keyword), dict):
            for name, subschema in schema[keyword].items():
                check_schema_support(subschema, f"{path}/{keyword}/{name}")
    for keyword in _SCHEMA_LISTS:
        if isinstance(schema.get(keyword), list):
            for index, subschema in enumerate(schema[keyword]):
                check_schema_support(subschema, f"{path}/{keyword}/{index}")
    for keyword in _SCHEMAS:
        value = schema.get(keyword)
        for index, subschema in enumerate(value if isinstance(value, list) else [value]):
            check_schema_support(subschema, f"{path}/{keyword}" + (f"/{index}" if isinstance(value, list) else ""))
