"""Usage request ids are unique: rows spooled on disk may be offered twice and are stored once.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # older servers could not write a request twice, but keep the first row if they did
    op.execute("DELETE FROM usage WHERE id NOT IN (SELECT MIN(id) FROM usage GROUP BY request_id)")
    op.create_index(op.f("ix_usage_request_id"), "usage", ["request_id"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_usage_request_id"), table_name="usage")
