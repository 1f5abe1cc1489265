"""The ledger as it was before migrations: deliveries, delivery_history, backfills.

A frozen copy of the DDL the unversioned ledger created, so a ledger created by that code is stamped
at this revision and upgraded from here. Never edit it: change the tables in a new revision.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _key(length: int) -> sa.types.TypeEngine:
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    schema = op.get_context().config.attributes["schema"]
    op.create_table(
        "deliveries",
        sa.Column("destination", _key(32), primary_key=True),
        sa.Column("idempotency_key", _key(255), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("message_id", sa.String(255)),
        sa.Column("event_table", sa.String(128)),
        sa.Column("event_timestamp", sa.DateTime(timezone=True)),
        sa.Column("first_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("backfill_id", sa.String(100)),
        sa.Column("mode", sa.String(16)),
        schema=schema,
    )
    op.create_index("ix_deliveries_rejected", "deliveries", ["destination", "event_table"], schema=schema,
                    postgresql_where=sa.text("status = 'rejected'"), sqlite_where=sa.text("status = 'rejected'"))
    op.create_table(
        "delivery_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("backfill_id", sa.String(100)),
        sa.Column("mode", sa.String(16)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("superseded_at", sa.DateTime(timezone=True)),
        sa.Column("superseded_by_run", sa.String(250)),
        schema=schema,
    )
    op.create_index("ix_delivery_history_key", "delivery_history", ["destination", "idempotency_key"], schema=schema)
    op.create_table(
        "backfills",
        sa.Column("destination", sa.String(32), primary_key=True),
        sa.Column("backfill_id", sa.String(100), primary_key=True),
        sa.Column("timeframe_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("timeframe_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replace_existing_events", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("events_sent", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("closed_at", sa.DateTime(timezone=True)),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        schema=schema,
    )


def downgrade() -> None:
    raise NotImplementedError("ledger migrations are additive: restore a backup to go back")
