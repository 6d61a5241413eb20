"""InFlight: the chat requests this process is answering, per API key and per account.

It caps each key's and each account's concurrent requests (so one client cannot hold every place
in the batch, whether it uses one key or many) and tells a graceful shutdown when the last request
has ended. Used on the event loop only.
"""

from __future__ import annotations

from collections import Counter


class InFlight:
    def __init__(self, max_per_key: int, max_per_account: int | None = None):
        self.max_per_key = max_per_key
        self.max_per_account = max_per_account  # None: only the keys' cap
        self._by_key: Counter[int] = Counter()
        self._by_account: Counter[int] = Counter()

    @property
    def total(self) -> int:
        return sum(self._by_key.values())

    def of_key(self, key_id: int) -> int:
        return self._by_key[key_id]

    def of_account(self, account_id: int) -> int:
        return self._by_account[account_id]

    def max_for_account(self, plan_max: int | None) -> int | None:
        """The account's cap: this server's, or its plan's if that is lower."""
        caps = [cap for cap in (self.max_per_account, plan_max) if cap is not None]
        return min(caps) if caps else None

    def try_enter(self, key_id: int, account_id: int, plan_max: int | None = None) -> str | None:
        """Count one more request of `key_id` of `account_id`; None, or (nothing counted) "key" or
        "account": the one at its cap."""
        if self._by_key[key_id] >= self.max_per_key:
            return "key"
        account_max = self.max_for_account(plan_max)
        if account_max is not None and self._by_account[account_id] >= account_max:
            return "account"
        self._by_key[key_id] += 1
        self._by_account[account_id] += 1
        return None

    def leave(self, key_id: int, account_id: int) -> None:
        for counter, name in ((self._by_key, key_id), (self._by_account, account_id)):
            counter[name] -= 1
            if counter[name] <= 0:
                del counter[name]
