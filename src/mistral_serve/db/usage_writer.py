"""UsageWriter: usage rows spooled to disk at once and written to the database by a background thread,
in batches, so no request waits on the database and none is lost when it is away."""

from __future__ import annotations

from collections.abc import Sequence
import logging
import threading

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve.db import crud
from mistral_serve.db.crud import UsageRecord
from mistral_serve.db.usage_spool import UsageSpool

log = logging.getLogger(__name__)


class UsageWriter:
    """`record()` appends to the spool (never blocks on the database). A thread seals the spool's
    segment every `flush_interval_s` and inserts its rows, up to `max_batch` per transaction, along
    with segments that other or earlier processes left behind. While the database refuses them,
    rows stay on disk and the writer retries every `retry_interval_s`; `close()` makes a last attempt
    and leaves what is still unwritten for the next start."""

    def __init__(self, sessions: sessionmaker[Session], spool: UsageSpool, *, max_batch: int = 500,
                 flush_interval_s: float = 0.25, retry_interval_s: float = 1.0):
        self.sessions = sessions
        self.spool = spool
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.is_database_reachable = True  # as the last attempt found it
        self.backlog_bytes_seen = 0  # the spool's size after the last pass: cheap to read per request
        self._wake = threading.Condition()
        self._waiters: list[threading.Event] = []
        self._is_stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._is_stopping = False
            self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
            self._thread.start()

    def record(self, record: UsageRecord) -> None:
        self.spool.append(record)

    def backlog_bytes(self) -> int:
        """Bytes of usage rows on disk waiting for the database."""
        return self.spool.backlog_bytes()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row recorded before this call is in the database; False on timeout."""
        if self._thread is None:
            return False
        written = threading.Event()
        with self._wake:
            self._waiters.append(written)
            self._wake.notify()
        return written.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        with self._wake:
            self._is_stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the usage writer did not finish within %.0f s", timeout)
        self._thread = None
        self.spool.close()
        backlog = self.spool.backlog_bytes()
        if backlog:
            log.warning("%d bytes of usage rows stay on disk in %s; they are written when the server next "
                        "starts with this data directory", backlog, self.spool.directory)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not (self._waiters or self._is_stopping):
                    self._wake.wait(self.flush_interval_s)
                waiters, self._waiters = self._waiters, []
                is_stopping = self._is_stopping
            is_complete = self._write_spool()
            self.backlog_bytes_seen = self.spool.backlog_bytes()
            if is_complete:
                for waiter in waiters:
                    waiter.set()
            else:
                with self._wake:
                    self._waiters[:0] = waiters  # they wait for the retry
            if is_stopping:
                return
            if not is_complete:
                with self._wake:
                    self._wake.wait_for(lambda: self._is_stopping, self.retry_interval_s)

    def write_pending(self) -> bool:
        """Write, in this thread, every segment that can be taken now (those of stopped processes
        included); False if the database refused one."""
        return self._write_spool()

    def _write_spool(self) -> bool:
        """Write every segment that can be taken, then seal ours and write it; False if the database
        refused one. While it refuses, our rows gather in one segment rather than in many."""
        if not self._write_segments():
            return False
        self.spool.seal()
        return self._write_segments()

    def _write_segments(self) -> bool:
        for path in self.spool.segment_paths():
            with self.spool.take(path) as segment:
                if segment is None:
                    continue
                if not self._write(segment.records):
                    return False
                segment.remove()
        return True

    def _write(self, records: Sequence[UsageRecord]) -> bool:
        """Insert `records`; False if the database cannot be reached (they are retried later). A row
        the database refuses for its content is set aside, so it cannot hold back the others."""
        for start in range(0, len(records), self.max_batch):
            try:
                self._write_or_set_aside(records[start:start + self.max_batch])
            except (OperationalError, InterfaceError) as error:  # gone, locked or refusing connections
                if self.is_database_reachable:
                    log.warning("cannot write usage rows yet; they wait on disk: %s", error)
                self.is_database_reachable = False
                return False
        self.is_database_reachable = True
        return True

    def _write_or_set_aside(self, records: Sequence[UsageRecord], is_retry: bool = False) -> None:
        try:
            with self.sessions() as session:
                crud.record_usage_batch(session, records)
        except (OperationalError, InterfaceError):
            raise
        except SQLAlchemyError as error:
            if not is_retry:  # a key deleted between the batch's look-up and its insert: the retry unlinks it
                return self._write_or_set_aside(records, is_retry=True)
            if len(records) == 1:
                self.spool.set_aside(records[0], str(error))
                return
            middle = len(records) // 2  # halve the batch until the refused rows are found
            self._write_or_set_aside(records[:middle])
            self._write_or_set_aside(records[middle:])
