"""Usage rows: written in batches by the background writer, summed per key, model and day."""

from datetime import date, timedelta

import pytest
from sqlalchemy import func, select

from mistral_serve.db import crud
from mistral_serve.db.models import Usage
from mistral_serve.db.usage_spool import UsageSpool
from mistral_serve.db.usage_writer import UsageWriter
from tests.db.helpers import DAY_1, DAY_2, FlakySessions, record


def test_totals_per_key_model_and_day_cover_only_the_account_and_range(db, keys):
    ann, ann_other, bob = keys
    with db() as session:
        crud.record_usage_batch(session, [
            record(ann, "a", 10, 5, when=DAY_1), record(ann, "a", 20, 7, when=DAY_2, cached_prompt_tokens=16),
            record(ann, "b", 3, 0, status="error", when=DAY_2), record(ann_other, "a", 1, 1, when=DAY_2),
            record(bob, "a", 1000, 1000, when=DAY_2)])
        by_key_model = crud.usage_totals(session, account_id=ann.account_id)
        by_day = crud.usage_totals(session, account_id=ann.account_id, by=("day",))
        by_model_day_2 = crud.usage_totals(session, account_id=ann.account_id, by=("model",), since=DAY_2,
                                           until=DAY_2 + timedelta(hours=1))
        everything = crud.usage_totals(session, by=())
    assert [(t.key_id, t.key_name, t.model, t.num_requests, t.num_failed_requests, t.prompt_tokens,
             t.cached_prompt_tokens, t.completion_tokens) for t in by_key_model] == [
        (ann.id, "laptop", "a", 2, 0, 30, 16, 12), (ann.id, "laptop", "b", 1, 1, 3, 0, 0),
        (ann_other.id, "server", "a", 1, 0, 1, 0, 1)]
    assert [(t.day, t.total_tokens, t.key_id, t.model) for t in by_day] == [
        (date(2025, 3, 1), 15, None, None), (date(2025, 3, 2), 32, None, None)]
    assert [(t.model, t.prompt_tokens) for t in by_model_day_2] == [("a", 21), ("b", 3)]
    assert everything[0].num_requests == 5 and everything[0].total_tokens == 2047
    with db() as session, pytest.raises(ValueError):
        crud.usage_totals(session, by=("hour",))


def test_totals_per_account_sum_every_key_of_each_account_in_one_list(db, keys):
    ann, ann_other, bob = keys
    with db() as session:
        crud.record_usage_batch(session, [record(ann, prompt=10, completion=5, when=DAY_1),
                                          record(ann_other, prompt=1, completion=1, when=DAY_2),
                                          record(bob, prompt=100, completion=50, status="error", when=DAY_2)])
        everything = crud.usage_totals(session, by=("account",))
        day_2 = crud.usage_totals(session, by=("account",), since=DAY_2)
    assert [(t.account_id, t.num_requests, t.num_failed_requests, t.total_tokens, t.key_id) for t in everything] == [
        (ann.account_id, 2, 0, 17, None), (bob.account_id, 1, 1, 150, None)]
    assert [(t.account_id, t.total_tokens) for t in day_2] == [(ann.account_id, 2), (bob.account_id, 150)]


def test_a_budget_counts_the_keys_tokens_since_the_period_start(db, keys):
    ann, ann_other, _ = keys
    with db() as session:
        crud.record_usage_batch(session, [record(ann, when=DAY_1), record(ann, when=DAY_2),
                                          record(ann_other, when=DAY_2)])
        assert crud.count_key_tokens(session, ann.id, DAY_2 - timedelta(minutes=30)) == 15
        assert crud.count_key_tokens(session, ann.id, DAY_1 - timedelta(days=1)) == 30
        assert crud.count_key_tokens(session, ann.id, DAY_2 + timedelta(days=1)) == 0


def test_rows_outlive_their_key_and_account(db, keys):
    ann, _, bob = keys
    with db() as session:
        crud.record_usage_batch(session, [record(ann), record(bob)])
        crud.delete_key(session, crud.get_key(session, ann.id))
        # a row that arrives after its key is gone is kept, unlinked
        crud.record_usage_batch(session, [record(ann, prompt=1, completion=1)])
        rows = session.execute(select(Usage.key_id, Usage.account_id, Usage.prompt_tokens).order_by(Usage.id)).all()
    assert [tuple(row) for row in rows] == [(None, ann.account_id, 10), (bob.id, bob.account_id, 10),
                                            (None, ann.account_id, 1)]


def test_an_unknown_status_is_refused(keys):
    with pytest.raises(ValueError):
        record(keys[0], status="weird")


def test_the_writer_batches_rows_and_writes_every_one_before_it_closes(db, keys, tmp_path):
    ann = keys[0]
    # only flush() and close() write soon
    writer = UsageWriter(db, UsageSpool(tmp_path), max_batch=7, flush_interval_s=60)
    writer.start()
    for index in range(10):
        writer.record(record(ann, prompt=index))
    assert writer.flush(timeout=10)
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Usage)) == 10
    for index in range(25):
        writer.record(record(ann, completion=index))
    writer.close()
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Usage)) == 35
        assert session.scalar(select(func.sum(Usage.completion_tokens))) == 10 * 5 + sum(range(25))


def test_the_writer_keeps_rows_while_the_database_refuses_them(db, keys, tmp_path):
    writer = UsageWriter(FlakySessions(db, failures=2), UsageSpool(tmp_path), flush_interval_s=0,
                         retry_interval_s=0.01)
    writer.start()
    writer.record(record(keys[0]))
    assert writer.flush(timeout=10)
    writer.close()
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Usage)) == 1


def test_the_usage_command_prints_a_row_per_key_and_model(tmp_path, capsys):
    from mistral_serve.cli import main
    from mistral_serve.cli_settings import open_database
    from mistral_serve.settings import Settings

    db = open_database(Settings(data_dir=tmp_path))
    with db() as session:
        ann = crud.create_account(session, "ann@example.com", password=None)
        bob = crud.create_account(session, "bob@example.com", password=None)
        ann_key, bob_key = crud.create_api_key(session, ann, "laptop")[0], crud.create_api_key(session, bob, "b")[0]
        crud.record_usage_batch(session, [record(ann_key, "a", 10, 5, when=DAY_1), record(ann_key, "b", 1, 2),
                                          record(ann_key, "a", 100, 50, when=DAY_2), record(bob_key, "a", 7, 7)])
    assert main(["usage", "--email", "ANN@example.com", "--since", "2025-03-01", "--until", "2025-03-01",
                 "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "MODEL", "REQUESTS", "FAILED", "PROMPT", "CACHED", "COMPLETION", "TOTAL"]
    assert [line.split() for line in lines[1:]] == [
        [str(ann_key.id), "laptop", "a", "1", "0", "10", "0", "5", "15"],
        [str(ann_key.id), "laptop", "b", "1", "0", "1", "0", "2", "3"],
        ["all", "2", "0", "11", "0", "7", "18"]]
    with pytest.raises(SystemExit) as bad_day:
        main(["usage", "--since", "March", "--data-dir", str(tmp_path)])
    assert bad_day.value.code == 2
