"""Segment Warehouses sample data on the real PostgreSQL and on SQLite (attached schema).

Each PostgreSQL test works in its own ``sample_<hex>`` schema, dropped afterwards;
each SQLite test in a temporary file attached as the schema.
"""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.unit.test_sample_data import (
    HOUR,
    HOURS,
    NOW,
    PER_HOUR,
    SEED,
    START,
    _sorted,
)
from usage_billing.sample_data import (
    BASE_COLUMNS,
    EVENTS,
    Sample,
    SampleStats,
    create_tables,
    event_table,
    generate,
    generate_rows,
    load,
    summarize,
)

_KIND_TYPES = {"string": sa.String, "integer": sa.Integer, "float": sa.Float, "timestamp": sa.DateTime}
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")



# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


def _pg_backend() -> Iterator[tuple[sa.Engine, str]]:
    engine = sa.create_engine(TEST_DATABASE_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        engine.dispose()
        pytest.fail(f"PostgreSQL at TEST_DATABASE_URL={TEST_DATABASE_URL} is not reachable: {error}")
    schema = f"sample_{uuid.uuid4().hex}"
    try:
        yield engine, schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def _sqlite_backend(directory: Path) -> Iterator[tuple[sa.Engine, str]]:
    schema = "prod_api"
    attached = directory / f"{schema}.db"
    engine = sa.create_engine(f"sqlite:///{directory / 'main.db'}")

    # The way the project's SQLite warehouse works: the source schema is an
    # attached database on every connection.
    @sa.event.listens_for(engine, "connect")
    def _attach(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"ATTACH DATABASE '{attached}' AS {schema}")

    try:
        yield engine, schema
    finally:
        engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[sa.Engine, str]]:
    """A fresh (engine, schema) on each backend."""
    if request.param == "postgresql":
        yield from _pg_backend()
    else:
        yield from _sqlite_backend(tmp_path)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[sa.Engine, str, SampleStats, dict[str, list[dict[str, Any]]]]]:
    """One generate() run per backend, shared by the read-only tests below.

    Yields the engine, the schema, the returned stats and the rows read back
    through :func:`event_table` (so timestamps come back as aware UTC).
    """
    gen = _pg_backend() if request.param == "postgresql" else _sqlite_backend(tmp_path_factory.mktemp("sample_sqlite"))
    engine, schema = next(gen)
    try:
        stats = generate(engine, schema, Sample(START, HOURS, PER_HOUR, seed=SEED, now=NOW))
        yield engine, schema, stats, _read_all(engine, schema)
    finally:
        gen.close()


def _read_all(engine: sa.Engine, schema: str, events: Iterable[str] = EVENTS) -> dict[str, list[dict[str, Any]]]:
    metadata = sa.MetaData()
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for slug in events:
            table = event_table(metadata, schema, slug)
            out[slug] = [dict(row._mapping) for row in conn.execute(sa.select(table))]
    return out


def test_create_tables_creates_segment_layout(backend: tuple[sa.Engine, str]) -> None:
    engine, schema = backend
    create_tables(engine, schema)
    create_tables(engine, schema)  # idempotent
    inspector = sa.inspect(engine)
    assert set(EVENTS) <= set(inspector.get_table_names(schema=schema))
    for slug, spec in EVENTS.items():
        reflected = inspector.get_columns(slug, schema=schema)
        assert [c["name"] for c in reflected] == list(spec.columns)
        kinds = dict(BASE_COLUMNS) | {p.column: p.kind for p in spec.properties}
        for column in reflected:
            assert isinstance(column["type"], _KIND_TYPES[kinds[column["name"]]]), column
            assert column["nullable"]
        by_name = {c["name"]: c for c in reflected}
        assert by_name["id"]["type"].length == 100
        if engine.dialect.name == "postgresql":
            assert by_name["timestamp"]["type"].timezone
            assert by_name["uuid_ts"]["type"].timezone
        # No primary key: the warehouse holds duplicate ids.
        assert not inspector.get_pk_constraint(slug, schema=schema)["constrained_columns"]


def test_create_tables_subset(backend: tuple[sa.Engine, str]) -> None:
    engine, schema = backend
    create_tables(engine, schema, events=["tokens_used"])
    assert sa.inspect(engine).get_table_names(schema=schema) == ["tokens_used"]


def test_row_counts_equal_stats(loaded: tuple) -> None:
    _, _, stats, read = loaded
    assert stats.per_event == {slug: len(rows) for slug, rows in read.items()}
    assert stats.rows == sum(stats.per_event.values())
    assert stats.unique_events == HOURS * PER_HOUR * len(EVENTS)
    assert stats.unique_events == len({r["id"] for rows in read.values() for r in rows})
    assert stats.duplicates == stats.rows - stats.unique_events > 0
    assert stats == summarize(read)


def test_duplicates_share_id_and_payload(loaded: tuple) -> None:
    _, _, stats, read = loaded
    extra = 0
    for rows in read.values():
        by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_id[r["id"]].append(r)
        for copies in by_id.values():
            if len(copies) == 1:
                continue
            extra += len(copies) - 1
            first, again = sorted(copies, key=lambda r: r["uuid_ts"])
            assert again["uuid_ts"] > first["uuid_ts"]
            assert {k: v for k, v in first.items() if k != "uuid_ts"} == {
                k: v for k, v in again.items() if k != "uuid_ts"
            }
    assert extra == stats.duplicates > 0


def test_anonymous_rows(loaded: tuple) -> None:
    _, _, stats, read = loaded
    anonymous = [r for rows in read.values() for r in rows if r["user_id"] is None]
    assert len(anonymous) == stats.anonymous > 0
    assert all(r["anonymous_id"] for r in anonymous)


def test_late_rows(loaded: tuple) -> None:
    engine, schema, stats, read = loaded
    late = [r for rows in read.values() for r in rows if r["uuid_ts"] - r["timestamp"] > HOUR]
    assert len(late) == stats.late > 0
    assert any(r["uuid_ts"] - r["timestamp"] > 6 * HOUR for r in late)
    # The database agrees (comparison done in SQL, not only in Python).
    table = event_table(sa.MetaData(), schema, "api_call")
    loaded_late = sa.select(sa.func.count()).where(table.c.uuid_ts > START + HOURS * HOUR)
    with engine.connect() as conn:
        in_db = conn.execute(loaded_late.select_from(table)).scalar_one()
    assert in_db == sum(r["uuid_ts"] > START + HOURS * HOUR for r in read["api_call"]) > 0


def test_rows_round_trip_exactly(loaded: tuple) -> None:
    # Same seed, same rows; and what the database returns is what was generated:
    # aware UTC datetimes to the microsecond, exact floats, ints, NULLs.
    _, _, _, read = loaded
    expected = generate_rows(Sample(START, HOURS, PER_HOUR, seed=SEED, now=NOW))
    for slug in EVENTS:
        assert _sorted(read[slug]) == _sorted(expected[slug])
    sample = read["payment_confirmed"][0]
    for column in ("timestamp", "original_timestamp", "sent_at", "received_at", "uuid_ts"):
        assert sample[column].tzinfo is not None
        assert sample[column].utcoffset() == timedelta(0)


def test_timestamps_are_stored_as_utc(loaded: tuple) -> None:
    engine, schema, _, read = loaded
    table = event_table(sa.MetaData(), schema, "tokens_used")
    expected = {r["id"]: r["timestamp"] for r in read["tokens_used"]}
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # Whatever the session time zone, the instants are the generated ones,
            # and event_table() hands them back in UTC.
            conn.execute(sa.text("SET TIME ZONE 'Asia/Kolkata'"))
        raw = conn.execute(sa.text(f'SELECT id, "timestamp" FROM "{schema}".tokens_used')).all()
        typed = conn.execute(sa.select(table.c.id, table.c.timestamp)).all()
        conn.rollback()
    assert all(ts.utcoffset() == timedelta(0) and expected[i] == ts for i, ts in typed)
    if engine.dialect.name == "postgresql":
        assert {i: ts for i, ts in raw} == expected  # same instants, shown at +05:30
        assert raw[0][1].utcoffset() == timedelta(hours=5, minutes=30)
    else:
        # SQLite keeps naive UTC text, in SQLAlchemy's format.
        assert {i: datetime.fromisoformat(ts).replace(tzinfo=UTC) for i, ts in raw} == expected
        assert raw[0][1][10] == " " and "+" not in raw[0][1]


# --------------------------------------------------------------------------
# load() on awkward input
# --------------------------------------------------------------------------


def test_load_escapes_text_and_accepts_sparse_rows(backend: tuple[sa.Engine, str]) -> None:
    engine, schema = backend
    create_tables(engine, schema, events=["api_call"])
    tricky = "tab\there\nnew line \\N back\\slash \"quote\" 'single' ünïcødé \r end"
    rows = {
        "api_call": [
            {
                "id": "ajs-1",
                "user_id": "cus_x",
                "event": "api_call",
                "event_text": "API Call",
                "timestamp": START,
                "received_at": START.replace(tzinfo=None),  # naive means UTC
                "uuid_ts": START.astimezone(UTC) + HOUR,
                "endpoint": tricky,
                "method": "",
                "status_code": 200,
                "bytes": 2**40,
            },
            {"id": "ajs-2", "endpoint": None},  # everything else NULL
        ]
    }
    load(engine, schema, rows)
    read = {r["id"]: r for r in _read_all(engine, schema, ["api_call"])["api_call"]}
    assert read["ajs-1"]["endpoint"] == tricky
    assert read["ajs-1"]["method"] == ""  # empty string is not NULL
    assert read["ajs-1"]["bytes"] == 2**40
    assert read["ajs-1"]["received_at"] == START
    assert read["ajs-1"]["uuid_ts"] == START + HOUR
    assert read["ajs-1"]["anonymous_id"] is None
    assert all(v is None for k, v in read["ajs-2"].items() if k != "id")


def test_load_rejects_unknown_columns_and_events(backend: tuple[sa.Engine, str]) -> None:
    engine, schema = backend
    create_tables(engine, schema)
    with pytest.raises(ValueError, match="unknown columns"):
        load(engine, schema, {"api_call": [{"id": "x", "tokens": 1}]})
    with pytest.raises(ValueError, match="unknown sample event"):
        load(engine, schema, {"page_viewed": [{"id": "x"}]})
    assert _read_all(engine, schema) == {slug: [] for slug in EVENTS}


def test_generate_twice_appends_and_clips_at_now(backend: tuple[sa.Engine, str]) -> None:
    engine, schema = backend
    now = START + timedelta(hours=3, minutes=15)
    stats = generate(engine, schema, Sample(START, 6, 20, seed=5, events=["api_call"], now=now, customers=3))
    assert sa.inspect(engine).get_table_names(schema=schema) == ["api_call"]
    read = _read_all(engine, schema, ["api_call"])
    assert stats.per_event == {"api_call": len(read["api_call"])}
    assert max(r["uuid_ts"] for r in read["api_call"]) <= now
    assert {r["user_id"] for r in read["api_call"]} - {None} <= {"cus_acme", "cus_globex", "cus_initech"}
    again = generate(engine, schema, Sample(START, 6, 20, seed=5, events=["api_call"], now=now, customers=3))
    assert again == stats
    assert len(_read_all(engine, schema, ["api_call"])["api_call"]) == 2 * stats.rows


def test_generic_insert_path_matches_fast_path(backend: tuple[sa.Engine, str]) -> None:
    # Databases without a fast path (not psycopg2, not SQLite) use SQLAlchemy's
    # executemany; it must store the same thing.
    from usage_billing import sample_data

    engine, schema = backend
    create_tables(engine, schema)
    rows = generate_rows(Sample(START, 2, 15, seed=9, now=NOW))
    metadata = sa.MetaData()
    sample_data._load_insert(engine, [(event_table(metadata, schema, slug), batch) for slug, batch in rows.items()])
    read = _read_all(engine, schema)
    assert all(_sorted(read[slug]) == _sorted(rows[slug]) for slug in EVENTS)


def test_generate_in_the_future_creates_empty_tables(backend: tuple[sa.Engine, str]) -> None:
    engine, schema = backend
    stats = generate(engine, schema, Sample(NOW + HOUR, 3, 10, now=NOW))
    assert stats == SampleStats(per_event=dict.fromkeys(EVENTS, 0))
    assert _read_all(engine, schema) == {slug: [] for slug in EVENTS}
    with pytest.raises(TypeError, match="unexpected keyword"):
        generate(engine, schema, Sample(START, 1, 1, now=NOW, customer=3))
    with pytest.raises(ValueError):
        generate(engine, schema, Sample(START, 1, -1, now=NOW))
