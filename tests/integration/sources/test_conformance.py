"""The same reads on every warehouse source, compared with the PostgreSQL reader on the same rows.

EMULATED: Snowflake runs on fakesnow's server and BigQuery on bqemulator (both DuckDB underneath),
each reached by its real client library through the Airflow connection; Redshift's SQL runs on
PostgreSQL. These tests prove the client path, the SQL each source generates (where the emulator
accepts what the service accepts), the frame shape, deduplication, chunking and typing. They prove
nothing about the services' semantics beyond that, nor about cost, speed or concurrency.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from usage_billing import sample_data
from usage_billing.sources import Partition, ReadRequest, Window
from usage_billing.sources.postgres import create_engine
from usage_billing.sources.postgres.source import SqlSource

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
ALL = Window(START - timedelta(days=1), NOW + timedelta(days=1))


@pytest.fixture
def schema() -> str:
    return f"prod_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def reference(pg_url) -> Iterator[SqlSource]:
    """The PostgreSQL reader on the same rows: the frames every source must reproduce."""
    engine = create_engine(pg_url)
    source = SqlSource(engine, f"ref_{uuid.uuid4().hex[:10]}")
    yield source
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{source.schema}" CASCADE'))
    source.close()


@pytest.fixture(scope="module")
def sample_rows(reference):
    """Ten hours of sample events (duplicates, late rows, nulls), loaded once into PostgreSQL."""
    rows = sample_data.generate_rows(sample_data.Sample(START, 10, 50, seed=2, now=NOW))
    sample_data.create_tables(reference.engine, reference.schema)
    sample_data.load(reference.engine, reference.schema, rows)
    return rows


@pytest.fixture(scope="module")
def sample(harness, sample_rows):
    """The same rows in the warehouse under test, loaded once per warehouse: the tests only read them."""
    rows = sample_rows
    schema = f"prod_{uuid.uuid4().hex[:8]}"
    harness.load(schema, rows)
    source = harness.open(schema)
    yield source, rows
    source.close()


def request(table: str, window: Window | None, columns, chunk_size: int = 500, loaded_at: str = "received_at",
            **kwargs) -> ReadRequest:
    return ReadRequest(partition=kwargs.pop("partition", Partition(table)), window=window, columns=list(columns),
                       loaded_at_column=loaded_at, chunk_size=chunk_size, **kwargs)


def read(source, req: ReadRequest) -> list[pd.DataFrame]:
    return list(source.read(req))


def combined(chunks: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat(chunks, ignore_index=True)
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def assert_same_frames(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_window_lookback_duplicates_and_chunks(sample, reference):
    """One row per id, the latest loaded copy, copies counted, nothing outside [start - lookback, end),
    chunks of at most chunk_size: the same frames as the PostgreSQL reader."""
    source, rows = sample
    window = Window(START + timedelta(hours=6), START + timedelta(hours=7), lookback=timedelta(hours=2))
    in_window = [r for r in rows["api_call"] if window.scan_start <= r["received_at"] < window.end]
    ids = {r["id"] for r in in_window}
    assert len(ids) < len(in_window), "the sample holds duplicate rows in this window"
    columns = ["id", "user_id", "timestamp", "latency_ms", "received_at", "plan_tier"]

    chunks = read(source, request("api_call", window, columns, chunk_size=40))
    frame = combined(chunks)
    assert len(chunks) > 2 and max(len(c) for c in chunks) <= 40, "read in bounded chunks"
    assert sorted(frame["id"]) == sorted(ids), "every id once, nothing outside the window"
    assert int(frame["_copies"].sum()) == len(in_window) == source.count_rows("api_call", window, "received_at")
    assert source.count_events(request("api_call", window, ["id"])) == len(ids)
    latest = {}
    for r in in_window:
        latest[r["id"]] = max(latest.get(r["id"], r["received_at"]), r["received_at"])
    assert dict(zip(frame["id"], frame["received_at"], strict=True)) == {
        k: pd.Timestamp(v) for k, v in latest.items()}, "the most recently loaded copy is kept"
    assert_same_frames(frame, combined(read(reference, request("api_call", window, columns, chunk_size=40))))


@pytest.mark.parametrize("table", list(sample_data.EVENTS))
def test_every_column_of_every_event_as_postgres_reads_it(harness, sample, reference, table):
    """All columns of each sample event table, typed as the contract says (Int64, Float64, string, UTC).

    Copies of a row share ``received_at`` and differ in ``uuid_ts`` (when Segment loaded each), so
    ``uuid_ts`` orders them here: which of two tied copies a reader keeps is arbitrary on any warehouse.
    """
    source, _ = sample
    columns = [c for c in source.table_columns(table) if c not in harness.extra_columns]
    assert columns == list(sample_data.EVENTS[table].columns), "Segment's lower-case names, in table order"
    frame = combined(read(source, request(table, ALL, columns, loaded_at="uuid_ts")))
    want = combined(read(reference, request(table, ALL, columns, loaded_at="uuid_ts")))
    assert_same_frames(frame, want)
    assert str(frame["timestamp"].dtype) == "datetime64[us, UTC]"


def test_hash_buckets_partition_a_window_exactly(sample):
    source, _ = sample
    whole = set(combined(read(source, request("api_call", ALL, ["id"])))["id"])
    parts = [set(combined(read(source, request("api_call", ALL, ["id"], partition=Partition("api_call", b, 3))))["id"])
             for b in range(3)]
    assert set.union(*parts) == whole
    assert sum(len(p) for p in parts) == len(whole), "buckets do not overlap"
    assert all(parts)


def test_replay_reads_ids_whatever_their_load_time(sample, reference, monkeypatch):
    """A replay names ids, not a window; long id lists are split into several queries."""
    source, rows = sample
    ids = [*sorted({r["id"] for r in rows["tokens_used"]})[::37], "not-an-id"]
    monkeypatch.setattr(sys.modules[type(source).__module__], "IDS_PER_QUERY", 4, raising=False)
    frame = combined(read(source, request("tokens_used", None, ["id", "received_at", "input_tokens"], ids=ids)))
    assert sorted(frame["id"]) == ids[:-1]
    want = combined(read(reference, request("tokens_used", None, ["id", "received_at", "input_tokens"], ids=ids)))
    assert_same_frames(frame, want)


def test_an_id_read_from_a_recorded_load_skips_older_copies_and_finds_a_row_loaded_again_later(sample, reference):
    """``loaded_since`` (the earliest load the ledger recorded for chosen ids) prunes an id read on the
    loaded-at column: ids loaded only before it are not read, a row loaded again after it is, with
    its later copy. The same frames as the PostgreSQL reader."""
    source, rows = sample
    copies: dict[str, list] = {}
    for row in rows["api_call"]:
        copies.setdefault(row["id"], []).append(row["uuid_ts"])
    since = START + timedelta(hours=5)
    resynced = sorted(i for i, loads in copies.items() if min(loads) < since <= max(loads))[:5]
    before = sorted(i for i, loads in copies.items() if max(loads) < since)[:5]
    assert resynced and before, "the sample holds rows loaded again after the bound, and rows loaded only before"
    ids = [*resynced, *before]
    columns = ["id", "uuid_ts", "latency_ms"]
    req = request("api_call", None, columns, loaded_at="uuid_ts", ids=ids, loaded_since=since)
    frame = combined(read(source, req))
    assert sorted(frame["id"]) == resynced, "nothing loaded only before the bound; every row loaded again after it"
    assert dict(zip(frame["id"], frame["uuid_ts"], strict=True)) == {
        i: pd.Timestamp(max(copies[i])) for i in resynced}, "the later load is the copy read"
    assert_same_frames(frame, combined(read(reference, req)))
    assert source.count_events(req) == len(resynced)
    unbounded = combined(read(source, request("api_call", None, columns, loaded_at="uuid_ts", ids=ids)))
    assert sorted(unbounded["id"]) == sorted(ids), "without the bound every id is read"


def test_missing_table_is_none(sample):
    source, _ = sample
    assert source.table_columns("no_such_event") is None


EDGE_COLUMNS = [("id", "string"), ("note", "string"), ("small", "integer"), ("big", "integer"),
                ("ratio", "float"), ("flag", "boolean"), ("timestamp", "timestamp"), ("received_at", "timestamp")]
T0 = START + timedelta(hours=6)
EDGE_ROWS = [
    # id, text, integer, 64-bit integer, float, boolean, event time
    ("a", "plain", 1, 2**63 - 1, 1.5, True, datetime(2026, 11, 20, 6, 30, 1, 123456, tzinfo=UTC)),
    ("b", "", None, -(2**63), None, False, datetime(2026, 11, 20, 5, 0, tzinfo=UTC)),
    ("c", None, 0, None, -0.25, None, datetime(2026, 11, 20, 6, 59, 59, 999999, tzinfo=UTC)),
    ("d", 'comma, "quotes"\nand a newline', -5, 7, 1e300, True, datetime(2026, 11, 20, 6, 0, tzinfo=UTC)),
    ("e", "ünïcødé ✓ 日本語 🚀", 3, 3, 2.5e-300, False, datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)),
]


def test_typed_values_as_postgres_reads_them(harness, reference, schema):
    """UTC timestamps to the microsecond, 64-bit integers at both ends, unicode, floats, NULLs."""
    names = [n for n, _ in EDGE_COLUMNS]
    rows = [dict(zip(names, (*row, T0 + timedelta(minutes=i)), strict=True)) for i, row in enumerate(EDGE_ROWS)]
    metadata = sa.MetaData(schema=f"{reference.schema}_edge")
    types = {"string": sa.String(512), "integer": sa.BigInteger, "float": sa.Float, "boolean": sa.Boolean,
             "timestamp": sample_data.UTCDateTime}
    table = sa.Table("edge_events", metadata, *[sa.Column(n, types[k]) for n, k in EDGE_COLUMNS])
    with reference.engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(metadata.schema))
        metadata.create_all(conn)
        conn.execute(table.insert(), rows)
    edge = SqlSource(reference.engine, metadata.schema)
    harness.create(schema, "edge_events", EDGE_COLUMNS)
    harness.insert(schema, "edge_events", names, rows)
    source = harness.open(schema)
    try:
        window = Window(T0, T0 + timedelta(hours=1))
        frame = combined(read(source, request("edge_events", window, names, chunk_size=2)))
    finally:
        source.close()
    want = combined(read(edge, request("edge_events", window, names, chunk_size=2)))
    with reference.engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{metadata.schema}" CASCADE'))
    assert_same_frames(frame, want)
    assert frame.loc[0, "big"] == 2**63 - 1 and frame.loc[1, "big"] == -(2**63)
    assert frame.loc[0, "timestamp"] == pd.Timestamp("2026-11-20T06:30:01.123456Z")
    assert frame.loc[1, "note"] == "" and frame.loc[2, "note"] is pd.NA, "empty string and NULL stay apart"
    assert frame.loc[4, "note"] == "ünïcødé ✓ 日本語 🚀"
    assert frame.loc[1, "small"] is pd.NA and frame.loc[1, "ratio"] is pd.NA and frame.loc[2, "flag"] is pd.NA
    assert [str(frame[c].dtype) for c in names] == [
        "string", "string", "Int64", "Int64", "Float64", "boolean", "datetime64[us, UTC]", "datetime64[us, UTC]"]
