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
    loaded.count_rows("edge_events", window, "received_at")
    loaded.count_events(request("edge_events", window, ["id"]))

    statements = loaded.statements
    assert any(s.startswith("DECLARE ") for s in statements), "windows are read through a server-side cursor"
    assert any("FNV_HASH" in s for s in statements) and any(s.startswith("FETCH FORWARD 2 ") for s in statements)
    for statement in statements:
        parse_as_redshift(statement)
    functions = {f.sql_name() if not isinstance(f, exp.Anonymous) else f.name.upper()
                 for s in statements if not CURSOR.match(s) for f in parse_as_redshift(s).find_all(exp.Func)}
    # Only functions Redshift has (CAST from the driver rendering timestamps as literals).
    assert functions <= {"COUNT", "ROW_NUMBER", "ABS", "MOD", "FNV_HASH", "CAST", "AND"}, functions


def test_the_parse_check_can_fail():
    with pytest.raises(sqlglot.errors.ParseError):
        parse_as_redshift('SELECT "id" FROM "s"."t" WHERE "received_at" >= \'2026-01-01\' AND')


def test_a_read_stopped_early_leaves_the_connection_usable(loaded):
    reader = loaded.read(request("edge_events", Window(T0, T0 + timedelta(hours=1)), ["id"], chunk_size=1))
    assert len(next(reader)) == 1
    reader.close()  # the consumer stopped: the transaction (and the cursor) is rolled back
    assert loaded.count_rows("edge_events", Window(T0, T0 + timedelta(hours=1)), "received_at") == 9
