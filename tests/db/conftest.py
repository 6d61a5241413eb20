"""Fixtures of the storage tests."""

import pytest

from mistral_serve.db import crud


@pytest.fixture
def keys(db):
    """Two keys of ann, one of bob: (ann, ann_other, bob)."""
    with db() as session:
        ann = crud.create_account(session, "ann@example.com", password=None)
        bob = crud.create_account(session, "bob@example.com", password=None)
        return (crud.create_api_key(session, ann, "laptop")[0], crud.create_api_key(session, ann, "server")[0],
                crud.create_api_key(session, bob, "bob's")[0])
