"""A rejected event remembers the load of its row: overlapping windows stop rejecting it again.

``row_loaded_at`` is the warehouse row's loaded-at value (Segment's ``received_at`` or
``uuid_ts``) at the time the event was rejected, held or queued. A window delivery leaves out an
event the ledger holds as rejected when its row's loaded-at is not later than this: the same row
would be mapped and refused the same way. A row loaded again (fixed upstream and re-sent) has a
later loaded-at and is tried again. Rows written before this revision have NULL and are tried
once more, which stamps them. No index: rejections are looked up by key, on the primary key.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().config.attributes["schema"]
    with op.batch_alter_table("deliveries", schema=schema) as table:
        table.add_column(sa.Column("row_loaded_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    raise NotImplementedError("ledger migrations are additive: restore a backup to go back")
