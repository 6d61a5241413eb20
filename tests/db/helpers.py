"""What the usage tests share: a usage row to record, and a session factory that fails to write."""

from datetime import datetime, timezone
import uuid

from mistral_serve.db.crud import UsageRecord

DAY_1 = datetime(2025, 3, 1, 23, 30, tzinfo=timezone.utc)
DAY_2 = datetime(2025, 3, 2, 0, 30, tzinfo=timezone.utc)  # an hour later, the next day


def record(key, model="m", prompt=10, completion=5, status="ok", when=DAY_1, **fields) -> UsageRecord:
    return UsageRecord(request_id=f"chatcmpl-{uuid.uuid4().hex}", key_id=key.id, account_id=key.account_id,
                       model=model, status=status, http_status=200 if status == "ok" else 500, duration_ms=12,
                       prompt_tokens=prompt, completion_tokens=completion, created_at=when, **fields)


class FlakySessions:
    """A session factory whose first `failures` sessions fail to write."""

    def __init__(self, sessions, failures: int):
        self.sessions = sessions
        self.failures = failures

    def __call__(self):
        from sqlalchemy.exc import OperationalError

        if self.failures:
            self.failures -= 1
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return self.sessions()
