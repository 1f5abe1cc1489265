"""Day counts: what the daily completeness sweep counted per event day, for the Billing view.

One row per (destination, event day): the events the warehouse's event tables hold for the day
(rows the mapping rejects included) and how many of them the ledger had as delivered, rejected or
held when the sweep counted them. The sweep replaces
a day's row each time it counts that day again, so the row is its latest count. The Billing view
reads its "in the warehouse" and "missing" columns from here and never queries the warehouse.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().config.attributes["schema"]
    op.create_table(
        "day_counts",
        sa.Column("destination", sa.String(32), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("warehouse", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
        sa.Column("held", sa.Integer, nullable=False),
        sa.Column("counted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        schema=schema,
    )


def downgrade() -> None:
    raise NotImplementedError("ledger migrations are additive: restore a backup to go back")
