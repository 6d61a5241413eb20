"""Constrained decoding: a request's GuidedDecoding compiled into a grammar.

The grammar engine is xgrammar. Its view of the vocabulary is the tokenizer's own
(`ChatTokenizer.grammar_vocab`: each token's exact output bytes, special tokens never allowed),
sized to the model's vocabulary so padding ids are never allowed either; its stop tokens are the
tokenizer's EOS ids, which it allows only where the grammar may end.

Each sequence gets its own `GrammarMatcher` over the shared compiled grammar: the runner asks it
for a token bitmask before sampling and feeds it the sampled token after. Compiled grammars are
kept by grammar_cache.py; a served engine has them compiled in worker processes
(grammar_worker_pool.py), with the same `compile_guided`.
"""

from __future__ import annotations

from collections.abc import Iterable
import re

import xgrammar as xgr

from mistral_serve.engine.client import GuidedDecodingError
from mistral_serve.engine.params import GuidedDecoding

__all__ = ["KIND_NAMES", "CompiledGrammar", "GrammarMatcher", "allocate_token_bitmask", "check_schema_support",
           "compile_guided", "new_compiler", "tokenizer_info"]

CompiledGrammar = xgr.CompiledGrammar
GrammarMatcher = xgr.GrammarMatcher
allocate_token_bitmask = xgr.allocate_token_bitmask

KIND_NAMES = {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex", "ebnf": "grammar"}

# xgrammar's errors start with "[hh:mm:ss] source.cc:line: "
_ERROR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def tokenizer_info(vocab: list[bytes], vocab_size: int, stop_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    """The grammar engine's view of a tokenizer: `vocab` from `ChatTokenizer.grammar_vocab`,
    `vocab_size` the model's (the width of its logits)."""
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))


def new_compiler(info: xgr.TokenizerInfo, max_threads: int) -> xgr.GrammarCompiler:
    # our cache, not xgrammar's, decides what stays compiled
    return xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)


def compile_guided(compiler: xgr.GrammarCompiler, guided: GuidedDecoding) -> CompiledGrammar:
    """The compiled grammar; GuidedDecodingError (naming the problem) when it cannot be honoured."""
    if guided.kind == "json_schema":
        check_schema_support(guided.schema)
    try:
        # compact output: free whitespace would let a model pad forever instead of closing
        if guided.kind == "json_object":  # any object (the built-in JSON grammar allows any value)
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if guided.kind == "json_schema":  # strict: no properties beyond the schema's
            grammar = xgr.Grammar.from_json_schema(guided.spec, any_whitespace=False, strict_mode=True)
            return compiler.compile_grammar(with_escaped_control_characters(grammar))
        if guided.kind == "regex":
            return compiler.compile_regex(guided.spec)
        return compiler.compile_grammar(guided.spec)
    except (RuntimeError, ValueError) as error:
        if "bad_alloc" in str(error):  # out of memory (a grammar worker's capped address space): too big, not wrong
            raise MemoryError(f"compiling the {KIND_NAMES[guided.kind]} ran out of memory") from error
        reason = _ERROR_PREFIX.sub("", str(error)).strip()
        raise GuidedDecodingError(f"cannot constrain the output to this {KIND_NAMES[guided.kind]}: {reason}") from error


# RFC 8259 strings: any character but '"', '\\' and U+0000-U+001F, or an escape. The grammar
# engine writes the characters of a string with a length bound (minLength, maxLength) as "anything but
# a quote, a backslash, CR or LF": other control characters could go out raw, and JSON parsers reject
# them (a byte-fallback token such as <0x18> is enough). Each such character may instead be a JSON
# character or an escape, which counts as one character, as JSON Schema counts them.
_LOOSE_STRING_CHARACTER = r'(([^\"\\\r\n]))'
_JSON_STRING_CHARACTER = r'(([^\0-\x1f\"\\]) | ("\\" json_escape_of_string))'
_JSON_ESCAPE_RULE = r'json_escape_of_string ::= (([\"\\/bfnrt]) | ("u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]))'


def with_escaped_control_characters(grammar: xgr.Grammar) -> xgr.Grammar:
    """`grammar` (from a JSON schema) with every string character RFC 8259's: control characters escaped."""
    text = str(grammar)
    if _LOOSE_STRING_CHARACTER not in text:
        return grammar
    return xgr.Grammar.from_ebnf(f"{text.replace(_LOOSE_STRING_CHARACTER, _JSON_STRING_CHARACTER)}\n{_JSON_ESCAPE_RULE}\n")


# JSON Schema keywords the grammar engine accepts but does not enforce: output would not validate
_UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas",
                         "contains", "minContains", "maxContains", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "additionalItems")


def check_schema_support(schema, path: str = "#") -> None:
    """Raise GuidedDecodingError naming the first keyword this schema uses that the grammar cannot enforce."""
    if not isinstance(schema, dict):
        return

    def unsupported(keyword: str, detail: str = "") -> GuidedDecodingError:
        return GuidedDecodingError(f"JSON schema keyword {keyword!r} (at {path}) is not supported for constrained "
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
