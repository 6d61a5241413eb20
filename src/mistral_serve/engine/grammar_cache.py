"""GrammarCompilerCache: each distinct GuidedDecoding's compiled grammar, bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import os
import threading

from mistral_serve.engine.client import GuidedDecodingError
from mistral_serve.engine.grammar_bounds import MAX_GRAMMAR_CACHE_BYTES, MAX_GRAMMAR_CACHE_ENTRIES
from mistral_serve.engine.guided import CompiledGrammar, compile_guided, new_compiler, tokenizer_info
from mistral_serve.engine.params import GuidedDecoding

# what a remembered failure is counted as, besides its message: a cheap entry, but not a free one
_FAILURE_OVERHEAD_BYTES = 256


@dataclass
class _Entry:
    """A grammar, a failure, or (`compile` in another thread) one in progress."""

    is_done: threading.Event = field(default_factory=threading.Event)
    grammar: CompiledGrammar | None = None
    error: str | None = None
    num_bytes: int = 0


class GrammarCompilerCache:
    """The compiled grammars of one tokenizer and model vocabulary, and the specs known not to compile.

    Bounded by the compiled grammars' own sizes (`memory_size_bytes`, a few hundred KB to tens of MB
    each) and by entries; the least recently used go first. Dropping one never breaks a request: a
    request carries its compiled grammar from the time it is queued.

    Thread-safe. A served engine fills it from its grammar workers (`put`, `put_failure`); an engine
    used on its own compiles here, in the caller's thread (`compile`), two threads asking for the same
    spec sharing one compilation.
    """

    def __init__(self, tokenizer, vocab_size: int, *, max_bytes: int = MAX_GRAMMAR_CACHE_BYTES,
                 max_entries: int = MAX_GRAMMAR_CACHE_ENTRIES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: the width of its logits
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.num_bytes = 0
        self.num_compilations = 0  # done here, in-process
        self._compiler = None
        self._lock = threading.Lock()
        self._entries: OrderedDict[GuidedDecoding, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, guided: GuidedDecoding) -> CompiledGrammar | None:
        """The compiled grammar, None when there is none (yet); GuidedDecodingError for a spec known
        not to compile."""
        with self._lock:
            entry = self._entries.get(guided)
            if entry is None or not entry.is_done.is_set():
                return None
            self._entries.move_to_end(guided)
        if entry.error is not None:
            raise GuidedDecodingError(entry.error)
        return entry.grammar

    def put(self, guided: GuidedDecoding, grammar: CompiledGrammar) -> None:
        self._store(guided, _done(_Entry(grammar=grammar, num_bytes=grammar.memory_size_bytes)))

    def put_failure(self, guided: GuidedDecoding, error: GuidedDecodingError) -> None:
        message = str(error)
        self._store(guided, _done(_Entry(error=message, num_bytes=_FAILURE_OVERHEAD_BYTES + len(message))))

    def compile(self, guided: GuidedDecoding) -> CompiledGrammar:
        """The compiled grammar, compiled here if it is not cached; GuidedDecodingError when it cannot
        be honoured. For an engine used on its own: a served one compiles in its grammar workers."""
        with self._lock:
            entry = self._entries.get(guided)
            is_owner = entry is None
            if is_owner:
                entry = self._entries[guided] = _Entry()
                self.num_compilations += 1
            else:
                self._entries.move_to_end(guided)
        if is_owner:
            try:
                entry.grammar = compile_guided(self._get_compiler(), guided)
                entry.num_bytes = entry.grammar.memory_size_bytes
            except GuidedDecodingError as error:
                entry.error = str(error)
                entry.num_bytes = _FAILURE_OVERHEAD_BYTES + len(entry.error)
            finally:
                with self._lock:  # done and counted at once, so that eviction never sees one without the other
                    entry.is_done.set()
                    if self._entries.get(guided) is entry:
                        self.num_bytes += entry.num_bytes
                    self._evict()
        entry.is_done.wait()
        if entry.error is not None:
            raise GuidedDecodingError(entry.error)
        return entry.grammar

    def _store(self, guided: GuidedDecoding, entry: _Entry) -> None:
        with self._lock:
            old = self._entries.pop(guided, None)
            if old is not None and old.is_done.is_set():
                self.num_bytes -= old.num_bytes
            self._entries[guided] = entry
            self.num_bytes += entry.num_bytes
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entries until both bounds hold (lock held). An entry being
        compiled counts no bytes yet; dropped, it is still returned to whoever waits on it."""
        while self._entries and (self.num_bytes > self.max_bytes or len(self._entries) > self.max_entries):
            _, entry = self._entries.popitem(last=False)
            if entry.is_done.is_set():
                self.num_bytes -= entry.num_bytes

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                info = tokenizer_info(self.tokenizer.grammar_vocab(), self.vocab_size, self.tokenizer.eos_token_ids)
                self._compiler = new_compiler(info, max_threads=min(8, os.cpu_count() or 1))
            return self._compiler


def _done(entry: _Entry) -> _Entry:
    entry.is_done.set()
    return entry
