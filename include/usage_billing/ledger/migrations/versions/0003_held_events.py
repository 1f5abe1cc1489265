"""Held events: stamped further in the future than the destination accepts, sent once due.

They are rows with status ``held`` (no new column). Each delivery run looks up the held events of
its table that are now due; this partial index makes that lookup read only held rows.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().config.attributes["schema"]
    held = sa.text("status = 'held'")
    op.create_index("ix_deliveries_held", "deliveries", ["destination", "event_table", "event_timestamp"],
                    schema=schema, postgresql_where=held, sqlite_where=held)


def downgrade() -> None:
    raise NotImplementedError("ledger migrations are additive: restore a backup to go back")
