"""The grammar cache: bounded by the compiled grammars' bytes, least recently used first out;
failures remembered cheaply."""

import pytest

from mistral_serve.engine.client import GuidedDecodingError
from mistral_serve.engine.grammar_cache import GrammarCompilerCache
from mistral_serve.engine.params import GuidedDecoding
from tests.engine.helpers import ByteTokenizer


def schema(name: str, num_properties: int = 8) -> GuidedDecoding:
    return GuidedDecoding.json_schema({"type": "object", "properties": {
        f"{name}{i}": {"type": "string", "maxLength": 8} for i in range(num_properties)}})


@pytest.fixture(scope="module")
def compiled():
    """Three distinct grammars, compiled once."""
    cache = GrammarCompilerCache(ByteTokenizer(), 256)
    return {name: (schema(name), cache.compile(schema(name))) for name in "abc"}


def test_past_its_bytes_the_least_recently_used_grammar_goes(compiled):
    (a, grammar_a), (b, grammar_b), (c, grammar_c) = compiled.values()
    cache = GrammarCompilerCache(ByteTokenizer(), 256, max_bytes=grammar_a.memory_size_bytes
                                 + grammar_b.memory_size_bytes + grammar_c.memory_size_bytes - 1)
    cache.put(a, grammar_a)
    cache.put(b, grammar_b)
    assert cache.get(a) is grammar_a  # now b is the least recently used
    cache.put(c, grammar_c)
    assert cache.get(b) is None
    assert cache.get(a) is grammar_a and cache.get(c) is grammar_c
    assert cache.num_bytes == grammar_a.memory_size_bytes + grammar_c.memory_size_bytes <= cache.max_bytes


def test_a_grammar_bigger_than_the_whole_cache_is_not_kept(compiled):
    (a, grammar_a), _, _ = compiled.values()
    cache = GrammarCompilerCache(ByteTokenizer(), 256, max_bytes=grammar_a.memory_size_bytes - 1)
    cache.put(a, grammar_a)
    assert cache.get(a) is None and cache.num_bytes == 0


def test_the_entry_bound_holds_too(compiled):
    cache = GrammarCompilerCache(ByteTokenizer(), 256, max_entries=2)
    for guided, grammar in compiled.values():
        cache.put(guided, grammar)
    assert len(cache) == 2 and cache.get(schema("a")) is None


def test_a_failure_is_remembered_for_a_few_hundred_bytes_and_raised_again():
    cache = GrammarCompilerCache(ByteTokenizer(), 256)
    bad = GuidedDecoding.json_schema({"type": "widget"})
    for _ in range(2):
        with pytest.raises(GuidedDecodingError, match="widget"):
            cache.compile(bad)
    assert cache.num_compilations == 1
    with pytest.raises(GuidedDecodingError, match="widget"):
        cache.get(bad)
    assert 0 < cache.num_bytes < 1024


def test_compiling_in_process_counts_its_bytes_and_evicts_past_them(compiled):
    (a, grammar_a), (b, _), _ = compiled.values()
    cache = GrammarCompilerCache(ByteTokenizer(), 256, max_bytes=grammar_a.memory_size_bytes)
    cache.compile(a)
    assert cache.num_bytes == grammar_a.memory_size_bytes
    cache.compile(b)
    assert cache.num_bytes <= cache.max_bytes and cache.get(a) is None
