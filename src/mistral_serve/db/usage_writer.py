"""UsageWriter: usage rows written by a background thread, in batches, so no request waits on the database."""

from __future__ import annotations

import logging
import queue
import threading
import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve.db import crud
from mistral_serve.db.crud import UsageRecord

log = logging.getLogger(__name__)

_STOP = object()


class UsageWriter:
    """`record()` only queues (never blocks); a thread inserts what is queued every `flush_interval_s`,
    up to `max_batch` rows per transaction. `close()` writes everything queued before it returns, so
    a clean stop loses no row. A batch the database refuses is retried until `close()`; rows still
    unwritten then are logged as lost."""

    def __init__(self, sessions: sessionmaker[Session], *, max_batch: int = 500, flush_interval_s: float = 0.25,
                 retry_interval_s: float = 1.0):
        self.sessions = sessions
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
            self._thread.start()

    def record(self, record: UsageRecord) -> None:
        self._queue.put(record)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row recorded before this call is written (or given up); False on timeout."""
        if self._thread is None:
            return False
        written = threading.Event()
        self._queue.put(written)
        return written.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the usage writer did not finish within %.0f s; queued usage rows may be lost", timeout)
        self._thread = None

    def _run(self) -> None:
        pending: list[UsageRecord] = []
        waiters: list[threading.Event] = []
        is_stopping = False
        while True:
            is_stopping = self._take(pending, waiters, wait=not pending) or is_stopping
            while pending:
                batch = pending[:self.max_batch]
                if self._write(batch):
                    del pending[:len(batch)]
                elif is_stopping:
                    log.error("lost %d usage rows: the database did not accept them before the server stopped",
                              len(pending))
                    pending.clear()
                else:
                    break  # the database is busy or gone: retry after a pause, keeping the rows
            if not pending:  # everything recorded before each flush() is written
                for waiter in waiters:
                    waiter.set()
                waiters.clear()
            if is_stopping:
                return
            if pending:
                time.sleep(self.retry_interval_s)

    def _take(self, pending: list[UsageRecord], waiters: list[threading.Event], wait: bool) -> bool:
        """Move queued rows into `pending` and flush requests into `waiters`. With `wait`, block for the
        first item, then gather more for `flush_interval_s` (one transaction for many rows); else take
        what is there. True if close() was called."""
        deadline = None
        while len(pending) < self.max_batch:
            try:
                if not wait:
                    item = self._queue.get_nowait()
                elif deadline is None:
                    item = self._queue.get()
                    deadline = time.monotonic() + self.flush_interval_s
                else:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            if isinstance(item, threading.Event):
                waiters.append(item)
                return False  # someone is waiting: write now
            pending.append(item)
        return False

    def _write(self, batch: list[UsageRecord]) -> bool:
        try:
            with self.sessions() as session:
                crud.record_usage_batch(session, batch)
            return True
        except SQLAlchemyError as error:
            log.warning("cannot write %d usage rows yet: %s", len(batch), error)
            return False
