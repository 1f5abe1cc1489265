"""``Ledger.known_clause``: "the ledger already has this event", for a query in the ledger's database."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from usage_billing.destinations.base import Rejection
from usage_billing.ledger import EventRefs, Ledger, RetryRejected, RunRef
from usage_billing.sources.postgres import create_engine

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 23, 14, 30, tzinfo=UTC)
RUN = RunRef("segment_to_orb", "manual__test")


@pytest.fixture
def events(tmp_path):
    """An SQLite warehouse whose ``api_call`` rows are delivered, rejected (at the load the table holds),
    rejected at an earlier load (the row was loaded again since), absent from the ledger, or
    delivered to another destination only; and its ledger."""
    engine = create_engine(f"sqlite:///{tmp_path}/wh.db", ["usage_billing"])
    ledger = Ledger(engine, "usage_billing")
    ledger.create()
    table = sa.Table("api_call", sa.MetaData(), sa.Column("id", sa.String), sa.Column("n", sa.Integer),
                     sa.Column("loaded_at", sa.Text))
    loads = {"delivered": T0, "rejected": T0, "reloaded": T1, "absent": T0, "kable-only": T0}
    with engine.begin() as conn:
        table.create(conn)
        # The warehouse's own text format (ISO 8601 with an offset), not the ledger's.
        conn.execute(table.insert(), [{"id": key, "n": n, "loaded_at": loads[key].isoformat()}
                                      for n, key in enumerate(loads, start=1)])
    ledger.mark_delivered("orb", RUN, EventRefs(["delivered", "1"], ["m1", "m5"], ["api_call"] * 2, [T0, T0]), T0)
    ledger.mark_rejected("orb", RUN, [Rejection("rejected", "m2", "api_call", "no customer", T0, loaded_at=T0),
                                      Rejection("reloaded", "m3", "api_call", "no customer", T0, loaded_at=T0)], T0)
    ledger.mark_delivered("kable", RUN, EventRefs(["kable-only"], ["m5"], ["api_call"], [T0]), T0)
    yield ledger, table
    engine.dispose()


def unknown(ledger: Ledger, table: sa.Table, column: str, retry: RetryRejected) -> set:
    """The rows the extraction would still read: ``NOT known``."""
    query = sa.select(table.c[column]).where(~ledger.known_clause("orb", table.c[column], retry, table.c.loaded_at))
    with ledger.engine.connect() as conn:
        return set(conn.execute(query).scalars())


@pytest.mark.parametrize(("retry", "expected"), [
    (RetryRejected.ALWAYS, {"rejected", "reloaded", "absent", "kable-only"}),
    (RetryRejected.RELOADED, {"reloaded", "absent", "kable-only"}),
    (RetryRejected.NEVER, {"absent", "kable-only"}),
], ids=["a replay sends rejected events again", "a window only those whose row was loaded again",
        "the sweep leaves rejected events to a replay"])
def test_known_events_are_left_out(events, retry, expected):
    ledger, table = events
    assert unknown(ledger, table, "id", retry) == expected


def test_the_same_rules_hold_for_a_chunk_of_keys_looked_up_outside_the_query(events):
    """``known_keys``: the per-chunk lookup of sources whose ledger is another database."""
    ledger, _ = events
    keys = ["delivered", "rejected", "reloaded", "absent", "kable-only"]
    loads = [T0, T0, T1, T0, T0]
    assert ledger.known_keys("orb", keys, RetryRejected.ALWAYS, loads) == {"delivered"}
    assert ledger.known_keys("orb", keys, RetryRejected.RELOADED, loads) == {"delivered", "rejected"}
    assert ledger.known_keys("orb", keys, RetryRejected.NEVER, loads) == {"delivered", "rejected", "reloaded"}
    stamps = np.array([np.datetime64(t.replace(tzinfo=None), "us") for t in loads])
    assert ledger.known_keys("orb", keys, RetryRejected.RELOADED, stamps) == {"delivered", "rejected"}
    unknown_loads = [T0, None, T1, T0, T0]
    assert ledger.known_keys("orb", keys, RetryRejected.RELOADED, unknown_loads) == {"delivered"}, \
        "a row whose load is unknown is tried again"


def test_a_rejection_from_before_0007_has_no_load_and_is_tried_once_more(events):
    ledger, table = events
    ledger.mark_rejected("orb", RUN, [Rejection("absent", "m4", "api_call", "no customer", T0)], T0)
    assert "absent" in unknown(ledger, table, "id", RetryRejected.RELOADED)
    assert ledger.rejected_loads("orb", ["absent", "rejected"]) == {"absent": None, "rejected": T0}


def test_a_key_column_that_is_not_text_is_compared_as_text(events):
    ledger, table = events
    assert unknown(ledger, table, "n", RetryRejected.ALWAYS) == {2, 3, 4, 5}, "the ledger holds key '1'"


def test_on_postgresql_the_key_is_compared_in_the_primary_keys_collation():
    ledger = Ledger(sa.create_engine("postgresql+psycopg2://nobody@127.0.0.1/none"), "usage_billing")
    table = sa.Table("api_call", sa.MetaData(), sa.Column("id", sa.String), sa.Column("n", sa.Integer))
    text = str(ledger.known_clause("orb", table.c.n, RetryRejected.ALWAYS).compile(dialect=postgresql.dialect()))
    assert 'CAST(api_call.n AS VARCHAR) COLLATE "C"' in text
    assert "usage_billing.deliveries.status =" in text
