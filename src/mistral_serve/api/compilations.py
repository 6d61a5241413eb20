"""Compilations: the grammar compilations this process runs, at most one per account at a time.

A grammar costs its compiler seconds of CPU (engine/grammar_bounds.py), and the compilers are few
(a small pool per model): without this, one account sending many new schemas at once would keep
them all busy, and every other account's schemas would wait. A second compilation of an account
that has one running is refused at once with a 429, rather than queued: the client learns to send
its schemas one after the other, and a request that finds its grammar compiled never gets here.

Per process, like the compilers it shares out. Used on the event loop only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mistral_serve.api.errors import APIError

RETRY_AFTER_S = "1"  # most compilations take well under a second


class Compilations:
    def __init__(self):
        self._accounts: set[int] = set()

    @contextmanager
    def of_account(self, account_id: int) -> Iterator[None]:
        """Count a compilation of `account_id` while the block runs; a 429 APIError when the account
        has one running already."""
        if account_id in self._accounts:
            raise APIError(429, "This account has a grammar (a JSON schema, or forced tool calls) being compiled "
                                "already; this server compiles one at a time per account. Retry when it is done: "
                                "a request whose schema is compiled already is not held up by this.",
                           type="requests", code="too_many_compilations", headers={"Retry-After": RETRY_AFTER_S})
        self._accounts.add(account_id)
        try:
            yield
        finally:
            self._accounts.discard(account_id)
