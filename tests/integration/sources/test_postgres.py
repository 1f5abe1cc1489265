"""The SQL source: windowed, chunked, deduplicated reads of Segment event tables on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from usage_billing import sample_data
from usage_billing.sources import Partition, ReadRequest, Window
from usage_billing.sources.postgres import create_engine
from usage_billing.sources.postgres.reader import count_window, read_events, table_columns

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["postgresql", "sqlite"])
def source(request, pg_url, schemas, tmp_path):
    if request.param == "postgresql":
        engine, schema = create_engine(pg_url), schemas[0]
    else:
        schema = "prod_api"
        engine = create_engine(f"sqlite:///{tmp_path}/wh.db", [schema])
    sample_data.generate(engine, schema, sample_data.Sample(START, hours=10, events_per_hour=50, seed=2, now=NOW))
    yield engine, schema
    engine.dispose()


def request(partition: Partition, window: Window | None, loaded_at: str, columns: list[str], chunk_size: int,
            ids: list[str] | None = None) -> ReadRequest:
    return ReadRequest(partition, window, columns, loaded_at, chunk_size, ids)


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
        chunks = list(read_events(conn, schema, request(Partition("api_call"), window, "received_at",
                                  ["id", "user_id", "timestamp", "latency_ms", "received_at"], chunk_size=40)))
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
        whole = set(pd.concat(read_events(conn, schema, request(Partition("api_call"), window, "received_at", ["id"],
                                                                500)))["id"])
        parts = [set(pd.concat(read_events(conn, schema, request(Partition("api_call", b, 3), window, "received_at",
                                                                 ["id"], 500)))["id"]) for b in range(3)]
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
        frame = pd.concat(read_events(conn, schema, request(Partition("tokens_used"), None, "received_at", ["id"], 100,
                                                            ids=ids)))
    assert sorted(frame["id"]) == sorted(set(ids))


def test_an_id_read_with_a_recorded_load_carries_the_loaded_at_predicate_and_finds_a_later_load(source, monkeypatch):
    """A read by id from the earliest load the ledger recorded (``loaded_since``): the statement sent
    bounds the loaded-at column, an id loaded only before the bound is not read, and a row loaded
    again after it is read with its later copy (PostgreSQL by COPY, SQLite by cursor)."""
    from usage_billing.sources.postgres import reader

    engine, schema = source
    table = sample_data.event_table(sa.MetaData(), schema, "api_call")
    with engine.begin() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.received_at).limit(3))]
        again = {**rows[1], "received_at": NOW + timedelta(hours=1), "latency_ms": 123_456}
        conn.execute(table.insert(), [again])
    since = rows[1]["received_at"]
    sent: list[str] = []
    for name in ("_read_by_copy", "_read_by_cursor"):
        def recorded(conn, statement, *args, _read=getattr(reader, name)):
            query = statement if isinstance(statement, sa.Select) else sa.select(statement)
            sent.append(str(query.compile(dialect=conn.dialect)))
            return _read(conn, statement, *args)
        monkeypatch.setattr(reader, name, recorded)
    ids = [r["id"] for r in rows]
    with engine.connect() as conn:
        frame = pd.concat(read_events(conn, schema, ReadRequest(Partition("api_call"), None,
                                                                ["id", "received_at", "latency_ms"], "received_at",
                                                                100, ids, loaded_since=since)))
    assert len(sent) == 1 and "received_at >=" in sent[0], sent
    assert sorted(frame["id"]) == sorted(ids[1:]), "the id loaded only before the bound is not read"
    latest = frame.set_index("id").loc[ids[1]]
    assert latest["latency_ms"] == 123_456 and latest["_copies"] == 2, "the later load is the copy read"


EDGE_ROWS = [
    # id, text, integer, big integer, float, boolean, timestamptz, naive timestamp, copies
    ("a", "plain", 1, 2**63 - 1, 1.5, True, datetime(2026, 11, 20, 6, 30, 1, 123456, tzinfo=UTC),
     datetime(2026, 11, 20, 6, 0), 1),
    ("b", "", None, -(2**63), float("nan"), False, None, None, 1),
    ("c", None, 0, None, float("inf"), None, datetime(2026, 11, 20, 6, 59, 59, 999999, tzinfo=UTC),
     datetime(1999, 12, 31, 23, 59, 59), 1),
    ("d", 'comma, "quotes"\nand a newline', -5, 7, float("-inf"), True,
     datetime(2026, 11, 20, 6, 0, tzinfo=UTC), None, 1),
    ("e", "\\N", 3, 3, None, False, datetime(2026, 11, 20, 6, 15, tzinfo=UTC), None, 1),
    ("f", "NaN", 4, 4, -0.0, True, datetime(2026, 11, 20, 6, 16, tzinfo=UTC), None, 1),
    ("g", "usage_billing_null_", 5, 5, 1e300, True, datetime(2026, 11, 20, 6, 17, tzinfo=UTC), None, 1),
    ("h", "ünïcødé ✓", 6, 6, 2.5, False, datetime(2026, 11, 20, 6, 18, tzinfo=UTC), None, 1),
]


def test_the_copy_read_returns_exactly_what_the_cursor_read_returns(pg_url, schemas, monkeypatch):
    """On PostgreSQL the window is streamed with COPY and parsed by pandas; every type and edge
    value must come back as the row-by-row cursor read returns it."""
    from usage_billing.sources.postgres import reader

    read_by_copy = reader._read_by_copy
    engine, schema = create_engine(pg_url), schemas[0]
    metadata = sa.MetaData(schema=schema)
    table = sa.Table("edge_events", metadata, sa.Column("id", sa.Text), sa.Column("note", sa.Text),
                     sa.Column("small", sa.Integer), sa.Column("big", sa.BigInteger),
                     sa.Column("ratio", sa.Float), sa.Column("flag", sa.Boolean),
                     sa.Column("timestamp", sa.DateTime(timezone=True)), sa.Column("naive_at", sa.DateTime),
                     sa.Column("received_at", sa.DateTime(timezone=True)))
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
        metadata.create_all(conn)
        conn.execute(table.insert(), [
            dict(zip(["id", "note", "small", "big", "ratio", "flag", "timestamp", "naive_at"], row[:8], strict=True))
            | {"received_at": START + timedelta(hours=6, minutes=i)} for i, row in enumerate(EDGE_ROWS)])
    window = Window(START + timedelta(hours=6), START + timedelta(hours=7))
    names = ["id", "note", "small", "big", "ratio", "flag", "timestamp", "naive_at", "received_at"]
    copies = []
    monkeypatch.setattr(reader, "_read_by_copy", lambda *args: copies.append(args) or read_by_copy(*args))
    with engine.connect() as conn:
        by_copy = pd.concat(read_events(conn, schema, request(Partition("edge_events"), window, "received_at", names,
                                                              chunk_size=3)))
        assert copies, "PostgreSQL with plain column types reads by COPY"
        by_cursor = pd.concat(read_events(conn, schema, request(Partition("edge_events"), window, "received_at", names,
                                                                chunk_size=3), copy=False))
    engine.dispose()
    by_copy = by_copy.sort_values("id").reset_index(drop=True)
    by_cursor = by_cursor.sort_values("id").reset_index(drop=True)
    assert len(by_copy) == len(EDGE_ROWS)
    pd.testing.assert_frame_equal(by_copy, by_cursor)
    assert by_copy.loc[1, "note"] == "" and by_copy.loc[2, "note"] is pd.NA, "empty string and NULL stay apart"
    assert by_copy.loc[4, "note"] == "\\N" and by_copy.loc[5, "note"] == "NaN"
    assert by_copy.loc[0, "big"] == 2**63 - 1 and by_copy.loc[0, "timestamp"].microsecond == 123456


def test_a_copy_read_stopped_early_leaves_the_engine_usable(source):
    engine, schema = source
    window = Window(START, START + timedelta(hours=10))
    with engine.connect() as conn:
        chunks = read_events(conn, schema, request(Partition("api_call"), window, "received_at", ["id", "received_at"],
                                                   chunk_size=10))
        first = next(chunks)
        chunks.close()  # the consumer failed or stopped: the COPY is cancelled, not left half read
    assert len(first) == 10
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
