"""Redshift specifics. NOT against Redshift: no local Redshift exists, so the Redshift source's SQL runs
on PostgreSQL (where the dialects agree; FNV_HASH is a stand-in, see conftest) and every statement it
sends is parsed with sqlglot's Redshift grammar. A parse proves the statement is Redshift syntax, not
what Redshift does with it (plans, leader-node materialisation, cost)."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
import sqlglot
from sqlglot import exp

from tests.integration.sources.test_conformance import EDGE_COLUMNS, T0, combined, request
from usage_billing.sources import Partition, Window

ROWS = [{"id": f"m{i % 4}", "note": "x", "small": i, "big": i, "ratio": 0.5, "flag": True, "timestamp": T0,
         "received_at": T0 + timedelta(minutes=i)} for i in range(9)]
CURSOR = re.compile(r"^(?:FETCH FORWARD \d+ FROM|CLOSE) usage_billing_[0-9a-f]{12}$")
DECLARE = re.compile(r"^DECLARE (usage_billing_[0-9a-f]{12}) CURSOR FOR (SELECT .*)$", re.S)


@pytest.fixture
def loaded(redshift):
    schema = f"prod_{uuid.uuid4().hex[:8]}"
    redshift.create(schema, "edge_events", EDGE_COLUMNS)
    redshift.insert(schema, "edge_events", [n for n, _ in EDGE_COLUMNS], ROWS)
    source = redshift.open(schema)
    yield source
    source.close()


def parse_as_redshift(statement: str) -> exp.Expression:
    """A statement in sqlglot's Redshift grammar; a SELECT must parse as a query, not an opaque command."""
    if CURSOR.match(statement):
        return exp.Command(this=statement.split()[0])
    if match := DECLARE.match(statement):
        statement = match.group(2)
    parsed = sqlglot.parse_one(statement, read="redshift", error_level=sqlglot.ErrorLevel.RAISE)
    assert isinstance(parsed, exp.Select), f"not parsed as a query: {statement[:200]}"
    return parsed


def test_every_statement_the_source_sends_is_redshift_sql(loaded):
    window = Window(T0, T0 + timedelta(hours=1), lookback=timedelta(minutes=5))
    names = [n for n, _ in EDGE_COLUMNS]
    assert loaded.table_columns("edge_events") == names
    frame = combined(list(loaded.read(request("edge_events", window, names, chunk_size=2))))
    assert list(frame["id"]) == ["m0", "m1", "m2", "m3"] and list(frame["small"]) == [8, 5, 6, 7]
    assert list(frame["_copies"]) == [3, 2, 2, 2]
    for bucket in range(2):
        list(loaded.read(request("edge_events", window, ["id"], partition=Partition("edge_events", bucket, 2))))
    list(loaded.read(request("edge_events", None, ["id"], ids=["m1", "m2"])))
    bounded = combined(list(loaded.read(request("edge_events", None, ["id"], ids=["m1", "m2"],
                                                loaded_since=T0 + timedelta(minutes=5)))))
    assert list(bounded["_copies"]) == [1, 1], "only the loads since the bound (m1 at 5 min, m2 at 6)"
    assert any(s.startswith("DECLARE ") and "\"id\" IN (" in s and "\"received_at\" >= '2026-11-20T06:05:00'" in s
               for s in loaded.statements), "an id read from a recorded load bounds the loaded-at column"
    loaded.count_rows("edge_events", window, "received_at")
    loaded.count_events(request("edge_events", window, ["id"]))

    statements = loaded.statements
    assert any(s.startswith("DECLARE ") for s in statements), "windows are read through a server-side cursor"
    assert any("FNV_HASH" in s for s in statements) and any(s.startswith("FETCH FORWARD 2 ") for s in statements)
    for statement in statements:
        parse_as_redshift(statement)
    functions = {f.sql_name() if not isinstance(f, exp.Anonymous) else f.name.upper()
                 for s in statements if not CURSOR.match(s) for f in parse_as_redshift(s).find_all(exp.Func)}
    # Only functions Redshift has (CAST from the driver rendering timestamps as literals; sqlglot names
    # version() CURRENT_VERSION).
    assert functions <= {"COUNT", "ROW_NUMBER", "ABS", "MOD", "FNV_HASH", "CAST", "AND", "CURRENT_VERSION"}, functions
    assert "SELECT version()" in statements and not any("pg_last_query_id" in s for s in statements), \
        "PostgreSQL is not Redshift: no query id asked for"
    assert loaded.cost.query_ids == [] and loaded.cost.rows_scanned


def test_the_parse_check_can_fail():
    with pytest.raises(sqlglot.errors.ParseError):
        parse_as_redshift('SELECT "id" FROM "s"."t" WHERE "received_at" >= \'2026-01-01\' AND')


def test_a_read_stopped_early_leaves_the_connection_usable(loaded):
    reader = loaded.read(request("edge_events", Window(T0, T0 + timedelta(hours=1)), ["id"], chunk_size=1))
    assert len(next(reader)) == 1
    reader.close()  # the consumer stopped: the transaction (and the cursor) is rolled back
    assert loaded.count_rows("edge_events", Window(T0, T0 + timedelta(hours=1)), "received_at") == 9


@pytest.fixture
def posing_as_redshift(redshift, pg_url):
    """A PostgreSQL session whose ``version()`` names Redshift and which has a ``pg_last_query_id()``
    (numbered by a sequence): schema functions found before pg_catalog on the search path."""
    import psycopg2

    shim = f"as_redshift_{uuid.uuid4().hex[:8]}"
    with redshift.connect() as conn, conn.cursor() as cursor:
        cursor.execute(f'CREATE SCHEMA "{shim}"')
        cursor.execute(f'CREATE SEQUENCE "{shim}".query_ids START 4201')
        cursor.execute(f"CREATE FUNCTION \"{shim}\".version() RETURNS text LANGUAGE sql AS "
                       f"$$ SELECT 'PostgreSQL 8.0.2 on i686-pc-linux-gnu, Redshift 1.0.77467'::text $$")
        cursor.execute(f"CREATE FUNCTION \"{shim}\".pg_last_query_id() RETURNS integer LANGUAGE sql AS "
                       f"$$ SELECT nextval('\"{shim}\".query_ids')::integer $$")
    connection = psycopg2.connect(**redshift.dsn, options=f"-c search_path={shim},pg_catalog,public")
    yield connection
    connection.close()
    with redshift.connect() as conn, conn.cursor() as cursor:
        cursor.execute(f'DROP SCHEMA "{shim}" CASCADE')


def test_on_redshift_each_query_reports_its_query_id_for_the_summary(redshift, posing_as_redshift):
    """EMULATED: PostgreSQL posing as Redshift (see the fixture). Proves the source asks
    PG_LAST_QUERY_ID() after each query once version() names Redshift and puts the ids in the task
    summary's warehouse line; not what a live Redshift answers."""
    from usage_billing.sources.redshift import KIND
    from usage_billing.sources.redshift.reader import RedshiftSource

    schema = f"prod_{uuid.uuid4().hex[:8]}"
    redshift.create(schema, "edge_events", EDGE_COLUMNS)
    redshift.insert(schema, "edge_events", [n for n, _ in EDGE_COLUMNS], ROWS)
    source = RedshiftSource(posing_as_redshift, schema, KIND)
    window = Window(T0, T0 + timedelta(hours=1))
    assert len(combined(list(source.read(request("edge_events", window, ["id"], chunk_size=2))))) == 4
    assert source.count_rows("edge_events", window, "received_at") == 9
    assert source.is_redshift()
    assert source.cost.query_ids == ["4201", "4202"], "one id per query: the read and the count"
    assert "query ids 4201, 4202" in source.cost.render()
    asked = [s for s in source.statements if "pg_last_query_id" in s]
    assert len(asked) == 2 and all(isinstance(parse_as_redshift(s), exp.Select) for s in asked)
    source.close()
