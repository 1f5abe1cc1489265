"""Events queued for their run's Orb backfill: past the grace period, sent one backfill per UTC day.

They are rows with status ``queued`` (no new column). A run's delivery tasks queue them; its
``backfill`` task (or the sweep, at its end) looks them up by UTC day and sends each day's events
inside one backfill. This partial index makes that lookup read only queued rows.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().config.attributes["schema"]
    queued = sa.text("status = 'queued'")
    op.create_index("ix_deliveries_queued", "deliveries", ["destination", "event_timestamp"],
                    schema=schema, postgresql_where=queued, sqlite_where=queued)


def downgrade() -> None:
    raise NotImplementedError("ledger migrations are additive: restore a backup to go back")
