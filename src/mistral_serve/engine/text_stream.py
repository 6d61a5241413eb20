"""TextStream: a sequence's output tokens as text deltas, cut at the first stop string.

Text that could be the beginning of a stop string is held back until it is known not to be one,
so a stop string split across tokens is caught and never returned.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, detokenizer, stop: tuple[str, ...] = ()):
        self.detokenizer = detokenizer
        self.stop = stop
        # any stop string that can still complete starts within this many trailing characters
        self.num_held_back = max((len(s) for s in stop), default=1) - 1
        self.held = ""
        self.is_stopped = False

    def push(self, token_id: int) -> str:
        """Feed one output token; return the text that is now safe to emit."""
        if self.is_stopped:
            return ""
        self.held += self.detokenizer.push(token_id)
        if self._may_cut_at_stop():
            return self._release_all()
        cut = len(self.held) - self.num_held_back
        if cut <= 0:
            return ""
        emitted, self.held = self.held[:cut], self.held[cut:]
        return emitted

    def finish(self) -> str:
        """The sequence ended: release what was held back (and any pending partial character)."""
        if not self.is_stopped:
            self.held += self.detokenizer.flush()
            self._may_cut_at_stop()
        return self._release_all()

    def _may_cut_at_stop(self) -> bool:
        # every earlier occurrence would have been caught when its last character arrived
        positions = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if not positions:
            return False
        self.held = self.held[:min(positions)]
        self.is_stopped = True
        return True

    def _release_all(self) -> str:
        text, self.held = self.held, ""
        return text
