"""The ledger's tables as the newest migration leaves them: what the queries are written against.

The migrations in ``migrations/versions`` create and change the tables; this module only describes
the result, and ``tests/integration/test_ledger_migrations.py`` proves the two agree. A new column
is added in both places: a migration, and here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sqlalchemy as sa

DELIVERED, REJECTED, HELD = "delivered", "rejected", "held"
# Delivered once, but reconciliation found the destination does not hold it: to be sent again under
# the same idempotency key (every delivery path sends what is neither delivered nor rejected).
LOST = "lost"
# Past the destination's grace period, waiting for the one backfill per UTC day its run opens
# (usage_billing.delivery.backfills.send_queued); sent like any undelivered event if that never happens.
QUEUED = "queued"


class RetryRejected(enum.Enum):
    """Whether a delivery sends again an event the ledger holds as rejected."""

    ALWAYS = "always"  # a replay of rejected events: that is what it is for
    RELOADED = "reloaded"  # a window: only if its row was loaded again since it was rejected
    NEVER = "never"  # the completeness sweep: rejected events are left to a replay


def key_type(length: int) -> sa.types.TypeEngine:
    """Keys compare byte-wise ("C" collation) on PostgreSQL: the primary-key index is written and
    probed once per event, and locale-aware comparison would cost several times more."""
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


@dataclass(frozen=True)
class LedgerTables:
    deliveries: sa.Table
    history: sa.Table
    backfills: sa.Table
    findings: sa.Table
    day_counts: sa.Table


def ledger_tables(schema: str) -> LedgerTables:
    """The ledger tables in ``schema`` (a new MetaData each call: one per Ledger)."""
    metadata = sa.MetaData(schema=schema)
    deliveries = sa.Table(
        "deliveries", metadata,
        sa.Column("destination", key_type(32), primary_key=True),
        sa.Column("idempotency_key", key_type(255), primary_key=True),
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
        # 0002: who was billed for what, for a per-customer view of the ledger.
        sa.Column("customer_id", sa.String(255)),
        sa.Column("event_name", sa.String(255)),
        # 0007: the warehouse row's loaded-at value when the event was rejected (or held, or queued):
        # an overlapping window leaves a rejected event alone until its row is loaded again.
        sa.Column("row_loaded_at", sa.DateTime(timezone=True)),
        # Only rejected rows need finding by status; delivered ones are found by key.
        sa.Index("ix_deliveries_rejected", "destination", "event_table",
                 postgresql_where=sa.text(f"status = '{REJECTED}'"), sqlite_where=sa.text(f"status = '{REJECTED}'")),
        # Partial: rows without a customer (all before 0002) cost no index entry; "customer_id = x"
        # implies NOT NULL, so a per-customer query still uses it.
        sa.Index("ix_deliveries_customer", "destination", "customer_id",
                 postgresql_where=sa.text("customer_id IS NOT NULL"), sqlite_where=sa.text("customer_id IS NOT NULL")),
        # 0003: held events are looked up by table and due time.
        sa.Index("ix_deliveries_held", "destination", "event_table", "event_timestamp",
                 postgresql_where=sa.text(f"status = '{HELD}'"), sqlite_where=sa.text(f"status = '{HELD}'")),
        # 0005: queued events are looked up by UTC day of their timestamp.
        sa.Index("ix_deliveries_queued", "destination", "event_timestamp",
                 postgresql_where=sa.text(f"status = '{QUEUED}'"), sqlite_where=sa.text(f"status = '{QUEUED}'")),
    )
    # Earlier deliveries of an event, kept when replace mode delivers it again.
    history = sa.Table(
        "delivery_history", metadata,
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
        sa.Index("ix_delivery_history_key", "destination", "idempotency_key"),
    )
    # Orb backfills this pipeline created or used, and what became of them.
    backfills = sa.Table(
        "backfills", metadata,
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
    )
    # 0003: what reconciliation found (usage_billing.reconcile), and whether it was healed.
    findings = sa.Table(
        "findings", metadata,
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
        sa.Index("ix_findings_key", "destination", "idempotency_key"),
    )
    # 0006: what the daily sweep counted per event day (usage_billing.delivery.sweep), its latest count
    # of each day: the warehouse side of the Billing view, which never queries the warehouse itself.
    day_counts = sa.Table(
        "day_counts", metadata,
        sa.Column("destination", sa.String(32), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("warehouse", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
        sa.Column("held", sa.Integer, nullable=False),
        sa.Column("counted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
    )
    return LedgerTables(deliveries, history, backfills, findings, day_counts)
