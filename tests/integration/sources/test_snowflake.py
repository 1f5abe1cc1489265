"""Snowflake specifics, EMULATED on fakesnow's server through the real connector and the Airflow hook:
Segment's names in either case, each timestamp type, and what a read reports about its cost."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pandas as pd
import pytest

from tests.integration.sources.conftest import SnowflakeHarness
from tests.integration.sources.test_conformance import EDGE_COLUMNS, T0, combined, request
from usage_billing.sources import Window

ROWS = [{"id": "m1", "note": "first", "small": 1, "big": 2**62, "ratio": 0.5, "flag": True,
         "timestamp": T0, "received_at": T0 + timedelta(minutes=1)},
        {"id": "m1", "note": "again", "small": 1, "big": 2**62, "ratio": 0.5, "flag": True,
         "timestamp": T0, "received_at": T0 + timedelta(minutes=9)},
        {"id": "m2", "note": "ünïcødé", "small": None, "big": -1, "ratio": None, "flag": False,
         "timestamp": T0, "received_at": T0 + timedelta(minutes=5)}]


@pytest.mark.parametrize(("quoted_lower", "timestamp_type"), [
    (False, "TIMESTAMP_TZ"), (False, "TIMESTAMP_NTZ"), (False, "TIMESTAMP_LTZ"), (True, "TIMESTAMP_TZ")],
    ids=["upper-tz", "upper-ntz", "upper-ltz", "quoted-lower-tz"])
def test_either_identifier_case_and_any_timestamp_type_reads_the_same(fakesnow_server, quoted_lower, timestamp_type):
    """Segment's DDL is unquoted (stored upper-case) by inference only, and its timestamp type is
    undocumented: the source resolves names case-insensitively and reads TZ, NTZ and LTZ as UTC."""
    schema = f"prod_{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        harness = SnowflakeHarness(fakesnow_server, monkeypatch, quoted_lower=quoted_lower,
                                   timestamp_type=timestamp_type)
        harness.create(schema, "edge_events", EDGE_COLUMNS)
        harness.insert(schema, "edge_events", [n for n, _ in EDGE_COLUMNS], ROWS)
        source = harness.open(schema)
        try:
            assert source.table_columns("edge_events") == [n for n, _ in EDGE_COLUMNS]
            window = Window(T0 + timedelta(minutes=2), T0 + timedelta(hours=1), lookback=timedelta(minutes=2))
            frame = combined(list(source.read(request("edge_events", window, [n for n, _ in EDGE_COLUMNS]))))
        finally:
            source.close()
    assert list(frame["id"]) == ["m1", "m2"]
    assert list(frame["note"]) == ["again", "ünïcødé"], "the most recently loaded copy"
    assert list(frame["_copies"]) == [2, 1]
    assert list(frame["received_at"]) == [pd.Timestamp(T0 + timedelta(minutes=9)),
                                          pd.Timestamp(T0 + timedelta(minutes=5))]
    assert str(frame["received_at"].dtype) == "datetime64[us, UTC]"
    assert frame.loc[0, "big"] == 2**62 and frame.loc[1, "small"] is pd.NA


def test_a_read_reports_its_query_id_and_rows(snowflake):
    schema = f"prod_{uuid.uuid4().hex[:8]}"
    snowflake.create(schema, "edge_events", EDGE_COLUMNS)
    snowflake.insert(schema, "edge_events", [n for n, _ in EDGE_COLUMNS], ROWS)
    source = snowflake.open(schema)
    try:
        frames = list(source.read(request("edge_events", Window(T0, T0 + timedelta(hours=1)), ["id"], chunk_size=1)))
    finally:
        source.close()
    assert [len(f) for f in frames] == [1, 1], "re-cut to chunk_size"
    assert source.cost.queries == 1 and len(source.cost.query_ids) == 1 and source.cost.query_ids[0]
    assert source.cost.rows_scanned == 3, "rows the window matched, duplicates included"
    assert "1 queries" in source.cost.render()
