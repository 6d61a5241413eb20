"""Plans, operators and invitations: the operator's ceilings on accounts and keys.

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("is_default", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_concurrent_requests", sa.Integer(), nullable=True),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=True),
        sa.Column("tokens_per_month", sa.BigInteger(), nullable=True),
        sa.Column("max_keys", sa.Integer(), nullable=True),
        sa.Column("max_n", sa.Integer(), nullable=True),
        sa.Column("max_output_tokens", sa.Integer(), nullable=True),
        sa.Column("models", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
        sa.UniqueConstraint("name", name=op.f("uq_plans_name")),
    )
    op.create_index("uq_plans_default", "plans", ["is_default"], unique=True,
                    sqlite_where=sa.text("is_default"), postgresql_where=sa.text("is_default"))
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("disabled_reason", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("is_self_registered", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("plan_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f("fk_accounts_plan_id_plans"), "plans", ["plan_id"], ["id"],
                                 ondelete="SET NULL")
        batch.create_index(op.f("ix_accounts_plan_id"), ["plan_id"], unique=False)
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("is_operator_disabled", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("disabled_reason", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("ceiling_requests_per_minute", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("ceiling_tokens_per_minute", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("ceiling_token_budget", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("ceiling_budget_period", sa.String(length=5), nullable=True))
        batch.create_check_constraint(op.f("ck_api_keys_ceiling_budget_period"),
                                      "ceiling_budget_period IN ('day', 'month')")
        batch.create_check_constraint(op.f("ck_api_keys_ceiling_budget_has_period"),
                                      "(ceiling_token_budget IS NULL) = (ceiling_budget_period IS NULL)")
    # keys an operator gave limits before there were ceilings: those limits become the ceiling, so that
    # the owner can no longer lift them (the accounts made with --no-password are the operator's)
    op.execute("UPDATE api_keys SET ceiling_requests_per_minute = requests_per_minute, "
               "ceiling_tokens_per_minute = tokens_per_minute, ceiling_token_budget = token_budget, "
               "ceiling_budget_period = budget_period "
               "WHERE account_id IN (SELECT id FROM accounts WHERE password_hash IS NULL)")
    op.create_table(
        "invites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=True),
        sa.Column("note", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_by_account_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name=op.f("fk_invites_plan_id_plans"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["used_by_account_id"], ["accounts.id"],
                                name=op.f("fk_invites_used_by_account_id_accounts"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invites")),
    )
    op.create_index(op.f("ix_invites_code_hash"), "invites", ["code_hash"], unique=True)


def downgrade() -> None:
    op.drop_table("invites")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_ceiling_budget_has_period"), type_="check")
        batch.drop_constraint(op.f("ck_api_keys_ceiling_budget_period"), type_="check")
        for column in ("ceiling_budget_period", "ceiling_token_budget", "ceiling_tokens_per_minute",
                       "ceiling_requests_per_minute", "disabled_reason", "is_operator_disabled"):
            batch.drop_column(column)
    with op.batch_alter_table("accounts") as batch:
        batch.drop_index(op.f("ix_accounts_plan_id"))
        batch.drop_constraint(op.f("fk_accounts_plan_id_plans"), type_="foreignkey")
        for column in ("plan_id", "is_self_registered", "is_admin", "disabled_reason"):
            batch.drop_column(column)
    op.drop_index("uq_plans_default", table_name="plans")
    op.drop_table("plans")
