"""IncrementalDetokenizer: generated token ids → text deltas, one token at a time.

The offsets method of vLLM: each step decodes only a short window, the tokens since the last
emitted text plus the group emitted just before them (the "prefix"), and emits what the new
tokens add to the prefix's text. Decoding the prefix too keeps the text's seams right: a
SentencePiece "▁" is a space inside a text and nothing at its start, and a character split over
byte tokens only shows once all its bytes are in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """All a detokenizer needs of a tokenizer (every ChatTokenizer is one)."""

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Invariant: the deltas of `push` and `flush` add up to `tokenizer.decode(all pushed ids)`."""

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        # token_ids[prefix_offset:read_offset] is the prefix; text up to read_offset is emitted
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", never half a character)."""
        self.token_ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        # a trailing U+FFFD is a character whose remaining bytes have not come yet
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """The output ended: return what was held back (an unfinished character becomes U+FFFD)."""
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text):
            return ""
        return self._emit(new_text[len(prefix_text):])

    def _decode_window(self) -> tuple[str, str]:
        window = self.token_ids[self._prefix_offset:]
        num_prefix = self._read_offset - self._prefix_offset
        decode = self._tokenizer.decode
        return (decode(window[:num_prefix], skip_special_tokens=self._skip_special_tokens),
                decode(window, skip_special_tokens=self._skip_special_tokens))

    def _emit(self, delta: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._text += delta
        return delta
