"""Reconciliation findings: what a comparison with the destination found, when, and whether it was healed.

One row per event key for an event the ledger has as delivered that the destination does not hold
(re-sent, then marked healed) or an event the destination holds that the ledger does not know
(reported only); one row per hour, without a key, for a count difference no key explains. Rows are
only ever added and marked healed: they are the audit trail of the billing system's agreement.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().config.attributes["schema"]
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("events", sa.Integer, nullable=False, server_default="1"),
        sa.Column("detail", sa.Text),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("healed_at", sa.DateTime(timezone=True)),
        sa.Column("healed_by_run", sa.String(250)),
        schema=schema,
    )
    op.create_index("ix_findings_key", "findings", ["destination", "idempotency_key"], schema=schema)


def downgrade() -> None:
    raise NotImplementedError("ledger migrations are additive: restore a backup to go back")
