"""The usage spool: rows on disk before the database, written once, whoever writes them and when."""

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from mistral_serve.db import crud
from mistral_serve.db.models import Usage
from mistral_serve.db.usage_spool import UsageSpool
from mistral_serve.db.usage_writer import UsageWriter
from tests.db.helpers import FlakySessions, record


@pytest.fixture
def spool_dir(tmp_path):
    return tmp_path / "spool"  # the SQLite database lives in tmp_path


def count_rows(db) -> int:
    with db() as session:
        return session.scalar(select(func.count()).select_from(Usage))


def test_a_row_is_on_disk_as_soon_as_it_is_recorded(spool_dir, keys):
    spool = UsageSpool(spool_dir)
    spool.append(record(keys[0], prompt=3))
    [segment] = list(spool_dir.glob("*.jsonl"))
    row = json.loads(segment.read_text())
    assert row["prompt_tokens"] == 3 and row["key_id"] == keys[0].id
    assert spool.backlog_bytes() == segment.stat().st_size


def test_rows_left_by_a_killed_process_are_written_by_the_next_one_once(db, keys, spool_dir):
    """A child process appends two rows and is killed; a torn last line (its request never ended) is
    ignored; a row already in the database (written before the kill) is not written twice."""
    written_before_the_kill = record(keys[0], completion=1)
    with db() as session:
        crud.record_usage_batch(session, [written_before_the_kill])
    rows = [written_before_the_kill, record(keys[0], completion=2)]
    child = subprocess.run([sys.executable, "-c", CHILD.format(directory=str(spool_dir))],
                           input="\n".join(json.dumps(spooled(row)) for row in rows), text=True, timeout=60)
    assert child.returncode == -9
    [segment] = list(spool_dir.glob("*.jsonl"))
    with segment.open("a") as torn:
        torn.write('{"request_id": "chatcmpl-torn", "key_')

    writer = UsageWriter(db, UsageSpool(spool_dir), flush_interval_s=60)
    writer.start()
    assert writer.flush(timeout=10)
    writer.close()
    assert count_rows(db) == 2
    with db() as session:
        assert sorted(session.scalars(select(Usage.completion_tokens))) == [1, 2]
    assert list(spool_dir.glob("*.jsonl")) == []


CHILD = """
import datetime, os, signal, sys
from mistral_serve.db.crud import UsageRecord
from mistral_serve.db.usage_spool import UsageSpool
import json
spool = UsageSpool(__import__("pathlib").Path({directory!r}))
for line in sys.stdin:
    row = json.loads(line)
    spool.append(UsageRecord(**{{**row, "created_at": datetime.datetime.fromisoformat(row["created_at"])}}))
os.kill(os.getpid(), signal.SIGKILL)
"""


def spooled(row) -> dict:
    from mistral_serve.db.usage_spool import _to_json
    return _to_json(row)


def test_a_live_process_keeps_its_active_segment_to_itself(db, keys, spool_dir):
    mine, theirs = UsageSpool(spool_dir), UsageSpool(spool_dir)
    theirs.append(record(keys[0]))  # not sealed: still being written
    writer = UsageWriter(db, mine, flush_interval_s=60)
    writer.start()
    assert writer.flush(timeout=10)
    assert count_rows(db) == 0
    theirs.seal()
    assert writer.flush(timeout=10)
    writer.close()
    assert count_rows(db) == 1


def test_rows_wait_on_disk_while_the_database_is_away_and_survive_a_stop(db, keys, spool_dir):
    spool = UsageSpool(spool_dir)
    writer = UsageWriter(FlakySessions(db, failures=10**6), spool, flush_interval_s=0, retry_interval_s=0.01)
    writer.start()
    for completion in range(5):
        writer.record(record(keys[0], completion=completion))
    assert not writer.flush(timeout=0.5)
    assert not writer.is_database_reachable
    writer.close()  # the database never came back: the rows stay on disk
    assert count_rows(db) == 0 and spool.backlog_bytes() > 0

    restarted = UsageWriter(db, UsageSpool(spool_dir), flush_interval_s=60)
    restarted.start()
    assert restarted.flush(timeout=10)
    restarted.close()
    assert count_rows(db) == 5
    assert restarted.is_database_reachable and restarted.backlog_bytes() == 0


def test_many_rows_are_written_in_batches_with_none_lost(db, keys, spool_dir):
    writer = UsageWriter(db, UsageSpool(spool_dir), max_batch=7, flush_interval_s=0.01)
    writer.start()
    for completion in range(100):
        writer.record(record(keys[0], completion=completion))
    writer.close()
    assert count_rows(db) == 100
    assert os.listdir(spool_dir) == []


def test_the_usage_command_counts_rows_a_stopped_server_left_on_disk(tmp_path, capsys):
    from mistral_serve.cli import main
    from mistral_serve.cli_settings import open_database
    from mistral_serve.settings import Settings

    settings = Settings(data_dir=tmp_path)
    db = open_database(settings)
    with db() as session:
        key = crud.create_api_key(session, crud.create_account(session, "ann@example.com", None), "laptop")[0]
    left_behind = UsageSpool(settings.usage_spool_dir)
    left_behind.append(record(key, prompt=20, completion=22))
    left_behind.seal()
    assert main(["usage", "--data-dir", str(tmp_path)]) == 0
    [_, row] = capsys.readouterr().out.splitlines()
    assert row.split()[-1] == "42"
    assert count_rows(db) == 1 and left_behind.backlog_bytes() == 0


def test_a_row_the_database_refuses_is_set_aside_and_holds_back_no_other(db, keys, spool_dir):
    from mistral_serve.db.usage_spool import REJECTED_FILE

    writer = UsageWriter(db, UsageSpool(spool_dir), flush_interval_s=60)
    writer.start()
    refused = record(keys[0], model="m" * 300)  # longer than the column: PostgreSQL refuses it
    for row in [record(keys[0], completion=1), refused, record(keys[0], completion=2)]:
        writer.record(row)
    assert writer.flush(timeout=10)
    writer.close()
    with db() as session:
        stored = sorted(session.scalars(select(Usage.completion_tokens)))
    if db.kw["bind"].dialect.name == "postgresql":
        assert stored == [1, 2]
        assert json.loads((spool_dir / REJECTED_FILE).read_text())["request_id"] == refused.request_id
    else:  # SQLite stores text of any length
        assert stored == [1, 2, 5]
    assert writer.backlog_bytes() == 0 and writer.is_database_reachable


def test_a_row_whose_key_is_deleted_while_it_is_written_is_kept_without_the_link(db, keys, spool_dir):
    """The key goes between the writer's look-up of the batch's keys and its insert (a dashboard
    deleting it at that moment): the insert fails on the foreign key once, and the retry unlinks it."""
    from mistral_serve.db import crud as real_crud

    ann = keys[0]

    class DeletingSessions:
        """Deletes ann's key right after the writer's first look-up."""
        is_deleted = False

        def __call__(self):
            session = db()
            if not DeletingSessions.is_deleted:
                original_scalars = session.scalars

                def scalars(statement, *args, **kwargs):
                    result = list(original_scalars(statement, *args, **kwargs))
                    if not DeletingSessions.is_deleted and "api_keys" in str(statement):
                        DeletingSessions.is_deleted = True
                        with db() as other:
                            real_crud.delete_key(other, real_crud.get_key(other, ann.id))
                    return result
                session.scalars = scalars
            return session
    writer = UsageWriter(DeletingSessions(), UsageSpool(spool_dir), flush_interval_s=60)
    writer.start()
    writer.record(record(ann, completion=7))
    assert writer.flush(timeout=10)
    writer.close()
    with db() as session:
        assert session.execute(select(Usage.key_id, Usage.completion_tokens)).all() == [(None, 7)]
