"""Windowed, chunked, deduplicated reads of Segment event tables on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from usage_billing import sample_data
from usage_billing.warehouse import Partition, Window, count_window, create_engine, read_events, table_columns

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["postgresql", "sqlite"])
def source(request, pg_url, schemas, tmp_path):
    if request.param == "postgresql":
        engine, schema = create_engine(pg_url), schemas[0]
    else:
        schema = "prod_api"
        engine = create_engine(f"sqlite:///{tmp_path}/wh.db", [schema])
    sample_data.generate(engine, schema, start=START, hours=10, events_per_hour=50, seed=2, now=NOW)
    yield engine, schema
    engine.dispose()


def expected(engine, schema, window: Window) -> pd.DataFrame:
    table = sample_data.event_table(sa.MetaData(), schema, "api_call")
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.id, table.c.received_at).where(
            table.c.received_at >= window.scan_start, table.c.received_at < window.end)).all()
    return pd.DataFrame(rows, columns=["id", "received_at"])


def test_window_lookback_dedup_and_chunks(source):
    engine, schema = source
    window = Window(START + timedelta(hours=6), START + timedelta(hours=7), lookback=timedelta(hours=2))
    truth = expected(engine, schema, window)
    assert truth["id"].duplicated().any(), "the sample holds duplicate rows in this window"
    with engine.connect() as conn:
        columns = table_columns(conn, schema, "api_call")
        chunks = list(read_events(conn, schema, Partition("api_call"), window, "received_at",
                                  ["id", "user_id", "timestamp", "latency_ms", "received_at"], chunk_size=40))
        total = count_window(conn, schema, "api_call", window, "received_at")
    frame = pd.concat(chunks)
    assert len(chunks) > 2, "read in bounded chunks"
    assert max(len(c) for c in chunks) <= 40
    assert sorted(frame["id"]) == sorted(set(truth["id"])), "one row per id, nothing outside the window"
    assert int(frame["_copies"].sum()) == len(truth) == total
    assert str(frame["latency_ms"].dtype) == "Int64", "integers stay integers"
    assert str(frame["timestamp"].dt.tz) == "UTC"
    assert (frame["received_at"] >= pd.Timestamp(window.scan_start)).all()
    assert (frame["received_at"] < pd.Timestamp(window.end)).all()
    assert "plan_tier" in columns


def test_hash_buckets_partition_a_window_exactly(source):
    engine, schema = source
    window = Window(START, START + timedelta(hours=10))
    with engine.connect() as conn:
        whole = set(pd.concat(read_events(conn, schema, Partition("api_call"), window, "received_at", ["id"], 500))["id"])
        parts = [set(pd.concat(read_events(conn, schema, Partition("api_call", b, 3), window, "received_at", ["id"],
                                           500))["id"]) for b in range(3)]
    assert set.union(*parts) == whole
    assert sum(len(p) for p in parts) == len(whole), "buckets do not overlap"
    assert all(parts)


def test_missing_table_is_none(source):
    engine, schema = source
    with engine.connect() as conn:
        assert table_columns(conn, schema, "no_such_event") is None


def test_replay_reads_ids_whatever_their_load_time(source):
    engine, schema = source
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.text(f'SELECT id FROM "{schema}".tokens_used LIMIT 5'))]
        frame = pd.concat(read_events(conn, schema, Partition("tokens_used"), None, "received_at", ["id"], 100, ids=ids))
    assert sorted(frame["id"]) == sorted(set(ids))
