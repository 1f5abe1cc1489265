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
