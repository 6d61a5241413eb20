"""UsageSpool: usage rows appended to files on local disk before the database sees them.

A request's row is on disk (in the operating system's page cache, fsynced when its file is sealed)
before its client sees the end of the reply, so a killed server or an unreachable database loses
no row: the files are written to the database later, by this process or by the next one to start
with the same data directory.

The directory holds segment files of JSON lines. Each process appends to its own active segment,
which it holds under an exclusive `flock` until it seals it; a sealed segment, or the active
segment of a process that died, can be locked and so taken by whichever writer gets there first.
Rows carry their request id and the database keeps request ids unique, so a segment written twice
(a process killed between the commit and the unlink) adds nothing the second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
import fcntl
import json
import logging
import os
from pathlib import Path
import threading
import time
from typing import IO

from mistral_serve.db.crud import UsageRecord

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".jsonl"
REJECTED_FILE = "rejected.json-lines"  # not a segment: never taken, never counted in the backlog


@dataclass
class Segment:
    """A segment this writer holds: its rows, and `remove()` once they are in the database."""

    path: Path
    records: list[UsageRecord]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class UsageSpool:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # usage rows name accounts: this user's only
        self._lock = threading.Lock()
        self._active: IO[str] | None = None
        self._active_path: Path | None = None
        self._num_active_rows = 0
        self._num_segments_opened = 0

    def append(self, record: UsageRecord) -> None:
        """Append one row to the active segment. Never waits on the database; a few microseconds."""
        line = json.dumps(_to_json(record), separators=(",", ":")) + "\n"
        with self._lock:
            if self._active is None:
                self._open_segment()
            self._active.write(line)
            self._active.flush()  # in the kernel's hands: survives this process being killed
            self._num_active_rows += 1

    def seal(self) -> None:
        """Close the active segment, durable on disk, so that a writer can take it."""
        with self._lock:
            if self._active is None or self._num_active_rows == 0:
                return
            os.fsync(self._active.fileno())
            self._active.close()  # releases the flock
            self._active, self._active_path, self._num_active_rows = None, None, 0

    def close(self) -> None:
        """Seal the active segment; an empty one is removed."""
        self.seal()
        with self._lock:
            if self._active is not None:
                self._active.close()
                self._active_path.unlink(missing_ok=True)
                self._active, self._active_path = None, None

    def set_aside(self, record: UsageRecord, reason: str) -> None:
        """Keep a row the database refused for its content in REJECTED_FILE, for a person to look at."""
        log.error("usage row %s refused by the database, set aside in %s: %s", record.request_id,
                  REJECTED_FILE, reason)
        with self._lock, (self.directory / REJECTED_FILE).open("a", encoding="utf-8") as file:
            file.write(json.dumps(_to_json(record), separators=(",", ":")) + "\n")

    def segment_paths(self) -> list[Path]:
        """Every segment but our active one, oldest first: those a writer may try to take."""
        with self._lock:
            active = self._active_path
        return sorted(path for path in self.directory.glob(f"*{SEGMENT_SUFFIX}") if path != active)

    def backlog_bytes(self) -> int:
        """Bytes of rows on disk that are not yet known to be in the database (all processes)."""
        total = 0
        for path in self.directory.glob(f"*{SEGMENT_SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # written and removed meanwhile
                pass
        return total

    @contextmanager
    def take(self, path: Path) -> Iterator[Segment | None]:
        """Hold the segment at `path` while the block writes it: None when another process holds it
        (its active segment, or one it is writing) or it is gone."""
        try:
            file = path.open("r", encoding="utf-8")
        except FileNotFoundError:
            yield None
            return
        with file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if not _is_same_file(path, file):  # written and removed by another writer since we opened it
                yield None
                return
            yield Segment(path, _read_records(path, file))

    def _open_segment(self) -> None:
        self._num_segments_opened += 1
        # names sort by creation time, so rows reach the database roughly in order
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._num_segments_opened}{SEGMENT_SUFFIX}"
        path = self.directory / name
        # made under another name and locked before it is renamed into view: a writer listing the
        # directory can never take (and remove) a new segment before its owner holds it
        unlisted = path.with_name(name + ".new")
        file = unlisted.open("x", encoding="utf-8")
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        os.rename(unlisted, path)
        self._active, self._active_path = file, path


def _is_same_file(path: Path, file: IO[str]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def _read_records(path: Path, file: IO[str]) -> list[UsageRecord]:
    records = []
    for number, line in enumerate(file, start=1):
        if not line.endswith("\n"):  # the process died while writing this line: its request never ended
            log.warning("%s: ignoring a partly written last line", path.name)
            break
        try:
            records.append(_from_json(json.loads(line)))
        except (ValueError, TypeError) as error:
            log.error("%s:%d: dropping an unreadable usage row: %s", path.name, number, error)
    return records


def _to_json(record: UsageRecord) -> dict:
    row = asdict(record)
    row["created_at"] = record.created_at.isoformat()
    return row


def _from_json(row: dict) -> UsageRecord:
    return UsageRecord(**{**row, "created_at": datetime.fromisoformat(row["created_at"])})
