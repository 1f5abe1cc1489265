"""BigQuery specifics, EMULATED on bqemulator through the real google-cloud-bigquery clients: the Storage
Read API carries the rows, every query carries maximum_bytes_billed and prunes partitions, results
tables are dropped. bqemulator reports 0 bytes and stamps every row's _PARTITIONTIME with the load
time, so what pruning and the byte cap save is not measured here, only that every query asks for it."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from tests.integration.sources.test_conformance import EDGE_COLUMNS, T0, combined, request
from usage_billing.sources import Partition, Window

ROWS = [{"id": f"m{i}", "note": "x", "small": i, "big": i, "ratio": 0.5, "flag": True, "timestamp": T0,
         "received_at": T0 + timedelta(minutes=i)} for i in range(5)]


@pytest.fixture
def loaded(bigquery):
    schema = f"prod_{uuid.uuid4().hex[:8]}"
    bigquery.create(schema, "edge_events", EDGE_COLUMNS)
    bigquery.insert(schema, "edge_events", [n for n, _ in EDGE_COLUMNS], ROWS)
    source = bigquery.open(schema)
    yield source
    source.close()


def test_rows_come_through_the_storage_read_api_and_results_tables_are_dropped(loaded, monkeypatch):
    sessions, queries = [], []
    create_read_session = loaded.read_client.create_read_session
    monkeypatch.setattr(loaded.read_client, "create_read_session",
                        lambda *a, **k: sessions.append(k) or create_read_session(*a, **k))
    query = loaded.client.query
    monkeypatch.setattr(loaded.client, "query", lambda sql, job_config: queries.append((sql, job_config))
                        or query(sql, job_config=job_config))
    window = Window(T0, T0 + timedelta(hours=1))
    frame = combined(list(loaded.read(request("edge_events", window, ["id", "small"], chunk_size=2,
                                              partition=Partition("edge_events", 0, 2)))))
    frame_other = combined(list(loaded.read(request("edge_events", window, ["id"], partition=Partition("edge_events", 1, 2)))))
    assert sorted([*frame["id"], *frame_other["id"]]) == [f"m{i}" for i in range(5)], "buckets split the ids"
    assert len(sessions) == 2, "one Storage Read session per read"
    assert all(config.maximum_bytes_billed == 10 * 2**30 for _, config in queries), "every query is byte-capped"
    assert all("_PARTITIONTIME >= TIMESTAMP_TRUNC(" in sql for sql, _ in queries), "every query prunes partitions"
    assert [t.table_id for t in loaded.client.list_tables("usage_billing_results")] == [], "results dropped"
    assert loaded.cost.queries == 2 and len(loaded.cost.query_ids) == 2
    assert loaded.cost.bytes_processed is not None, "bytes processed as BigQuery reports them"


def test_counts_are_byte_capped_queries_too(loaded, monkeypatch):
    queries = []
    query = loaded.client.query
    monkeypatch.setattr(loaded.client, "query", lambda sql, job_config: queries.append(job_config)
                        or query(sql, job_config=job_config))
    window = Window(T0, T0 + timedelta(hours=1))
    assert loaded.count_rows("edge_events", window, "received_at") == 5
    assert loaded.count_events(request("edge_events", window, ["id"])) == 5
    assert [c.maximum_bytes_billed for c in queries] == [10 * 2**30] * 2


def test_an_id_read_with_a_recorded_load_prunes_partitions_and_the_loaded_at_column(loaded, bigquery, monkeypatch):
    """A read by id (replay, held, queued, lost events) from the earliest load the ledger recorded:
    the query carries the loaded-at predicate and the _PARTITIONTIME one, so BigQuery scans only the
    partitions from that day on, and a row loaded again after the bound is read with its later copy."""
    reloaded = {**ROWS[1], "small": 100, "received_at": T0 + timedelta(hours=2)}
    bigquery.insert(loaded.schema, "edge_events", [n for n, _ in EDGE_COLUMNS], [reloaded])
    queries = []
    query = loaded.client.query
    monkeypatch.setattr(loaded.client, "query", lambda sql, job_config: queries.append((sql, job_config))
                        or query(sql, job_config=job_config))
    since = T0 + timedelta(minutes=3)
    frame = combined(list(loaded.read(request("edge_events", None, ["id", "small", "received_at"],
                                              ids=["m0", "m1", "m4"], loaded_since=since))))
    assert list(frame["id"]) == ["m1", "m4"], "m0 was loaded only before the bound"
    assert list(frame["small"]) == [100, 4], "m1's later load is the copy read"
    (sql, config), = queries
    assert "`id` IN UNNEST(@ids)" in sql
    assert "`received_at` >= @scan_start" in sql and "_PARTITIONTIME >= TIMESTAMP_TRUNC(@scan_start_ts, DAY)" in sql
    assert {p.name: p.value for p in config.query_parameters if p.name != "ids"} == {
        "scan_start": since, "scan_start_ts": since}
    assert config.maximum_bytes_billed == 10 * 2**30

    queries.clear()
    assert len(combined(list(loaded.read(request("edge_events", None, ["id"], ids=["m0", "m1", "m4"]))))) == 3
    assert "_PARTITIONTIME" not in queries[0][0], "without a bound nothing prunes (what the summary then says)"
