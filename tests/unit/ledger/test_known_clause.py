"""``Ledger.known_clause``: "the ledger already has this event", for a query in the ledger's database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from usage_billing.destinations.base import Rejection
from usage_billing.ledger import EventRefs, Ledger, RunRef
from usage_billing.sources.postgres import create_engine

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
RUN = RunRef("segment_to_orb", "manual__test")


@pytest.fixture
def events(tmp_path):
    """An SQLite warehouse whose ``api_call`` rows are delivered, rejected, absent from the ledger,
    or delivered to another destination only; and its ledger."""
    engine = create_engine(f"sqlite:///{tmp_path}/wh.db", ["usage_billing"])
    ledger = Ledger(engine, "usage_billing")
    ledger.create()
    table = sa.Table("api_call", sa.MetaData(), sa.Column("id", sa.String), sa.Column("n", sa.Integer))
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), [{"id": key, "n": n} for n, key in
                                      enumerate(["delivered", "rejected", "absent", "kable-only"], start=1)])
    ledger.mark_delivered("orb", RUN, EventRefs(["delivered", "1"], ["m1", "m5"], ["api_call"] * 2, [T0, T0]), T0)
    ledger.mark_rejected("orb", RUN, [Rejection("rejected", "m2", "api_call", "no customer", T0)], T0)
    ledger.mark_delivered("kable", RUN, EventRefs(["kable-only"], ["m4"], ["api_call"], [T0]), T0)
    yield ledger, table
    engine.dispose()


def unknown(ledger: Ledger, table: sa.Table, column: str, retry_rejected: bool) -> set:
    """The rows the extraction would still read: ``NOT known``."""
    query = sa.select(table.c[column]).where(~ledger.known_clause("orb", table.c[column], retry_rejected))
    with ledger.engine.connect() as conn:
        return set(conn.execute(query).scalars())


@pytest.mark.parametrize(("retry_rejected", "expected"), [
    (True, {"rejected", "absent", "kable-only"}),
    (False, {"absent", "kable-only"}),
], ids=["a normal run retries rejected events", "the sweep leaves rejected events to a replay"])
def test_known_events_are_left_out(events, retry_rejected, expected):
    ledger, table = events
    assert unknown(ledger, table, "id", retry_rejected) == expected


def test_a_key_column_that_is_not_text_is_compared_as_text(events):
    ledger, table = events
    assert unknown(ledger, table, "n", retry_rejected=True) == {2, 3, 4}, "the ledger holds key '1'"


def test_on_postgresql_the_key_is_compared_in_the_primary_keys_collation():
    ledger = Ledger(sa.create_engine("postgresql+psycopg2://nobody@127.0.0.1/none"), "usage_billing")
    table = sa.Table("api_call", sa.MetaData(), sa.Column("id", sa.String), sa.Column("n", sa.Integer))
    text = str(ledger.known_clause("orb", table.c.n).compile(dialect=postgresql.dialect()))
    assert 'CAST(api_call.n AS VARCHAR) COLLATE "C"' in text
    assert "usage_billing.deliveries.status IN" in text
