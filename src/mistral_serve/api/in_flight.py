"""InFlight: the chat requests this process is answering, per API key.

It caps each key's concurrent requests (so one client cannot hold every place in the batch) and
tells a graceful shutdown when the last request has ended. Used on the event loop only.
"""

from __future__ import annotations

from collections import Counter


class InFlight:
    def __init__(self, max_per_key: int):
        self.max_per_key = max_per_key
        self._by_key: Counter[int] = Counter()

    @property
    def total(self) -> int:
        return sum(self._by_key.values())

    def of_key(self, key_id: int) -> int:
        return self._by_key[key_id]

    def try_enter(self, key_id: int) -> bool:
        """Count one more request of `key_id`; False (nothing counted) when the key is at its cap."""
        if self._by_key[key_id] >= self.max_per_key:
            return False
        self._by_key[key_id] += 1
        return True

    def leave(self, key_id: int) -> None:
        self._by_key[key_id] -= 1
        if self._by_key[key_id] <= 0:
            del self._by_key[key_id]
