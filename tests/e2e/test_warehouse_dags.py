"""End to end on each emulated warehouse: the real ``segment_to_orb`` DAG, in-process with dag.test(),
with ``source.conn_id`` an ``AIRFLOW_CONN_`` connection of the warehouse's type (snowflake →
fakesnow, google_cloud_platform → bqemulator, redshift → PostgreSQL speaking Redshift's SQL) and
``ledger.conn_id`` a postgres connection.

Two hourly runs deliver every deliverable event of their windows to the Orb sandbox exactly once;
the same two hours again send nothing. EMULATED: proves the DAG, the operators' connection wiring and
the ledger on its own database, not the warehouses' behaviour (see tests/integration/sources).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import PROJECT
from tests.integration.conftest import config, connection_env, start_sandbox
from tests.integration.sources.conftest import emulated_warehouse
from usage_billing import sample_data
from usage_billing.ledger import Ledger
from usage_billing.settings import DEFAULT_MAXIMUM_BYTES_BILLED

HOURS = 2
LOOKBACK = timedelta(hours=6)


@pytest.mark.parametrize("kind", ["snowflake", "bigquery", "redshift"])
def test_segment_to_orb_delivers_two_hours_from_the_warehouse_once_and_again_sends_nothing(
        kind, request, airflow_db, pg_url, pg_engine, schemas, monkeypatch, tmp_path):
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    schema, ledger_schema = schemas
    # Segment's schema names are lower-case; a fresh one per test (Snowflake and BigQuery keep theirs).
    warehouse = emulated_warehouse(kind, request, schema, pg_url, monkeypatch)
    now = datetime.now(UTC)
    first_hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS)
    rows = sample_data.generate_rows(sample_data.Sample(first_hour - LOOKBACK, HOURS + 6, 30, seed=5, now=now))
    warehouse.load(rows)

    settings = config(schema, ledger_schema)
    settings["source"].update(conn_id=warehouse.conn_id, loaded_at_column=warehouse.loaded_at_column)
    settings["ledger"] = {"conn_id": "billing_ledger", "schema": ledger_schema}
    path = tmp_path / f"usage_billing_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    monkeypatch.setenv("AIRFLOW_CONN_BILLING_LEDGER",
                       sa.make_url(pg_url).set(drivername="postgresql").render_as_string(False))

    # What the two runs scan: loaded in [first hour - lookback, first hour + 2 h).
    scanned = [row for batch in rows.values() for row in batch
               if first_hour - LOOKBACK <= warehouse.loaded_at(row) < first_hour + timedelta(hours=HOURS)]
    deliverable = {row["id"] for row in scanned if row["user_id"]}
    anonymous = {row["id"] for row in scanned if not row["user_id"]}
    assert deliverable and anonymous

    caps = []
    if kind == "bigquery":  # every query the tasks send carries the byte cap (default: 100 GiB)
        from google.cloud import bigquery

        query = bigquery.Client.query
        monkeypatch.setattr(bigquery.Client, "query", lambda client, sql, job_config=None, **kw: caps.append(
            job_config.maximum_bytes_billed) or query(client, sql, job_config=job_config, **kw))

    dag = DagBag(dag_folder=str(PROJECT / "dags")).dags["segment_to_orb"]
    ledger = Ledger(pg_engine, ledger_schema)
    with start_sandbox("orb") as orb:
        for key, value in connection_env("orb", orb.url).items():
            monkeypatch.setenv(key, value)

        def run_hours() -> list:
            return [dag.test(logical_date=first_hour + timedelta(hours=hour + 1)).state for hour in range(HOURS)]

        assert run_hours() == [DagRunState.SUCCESS] * HOURS
        assert orb.accepted_keys() == deliverable
        assert len(orb.accepted()) == len(deliverable), "no event twice"
        if kind == "bigquery":
            assert caps and set(caps) == {DEFAULT_MAXIMUM_BYTES_BILLED}, caps
        assert ledger.counts("orb")["orb"] == {"delivered": len(deliverable), "rejected": len(anonymous)}

        requests = len(orb.requests)
        assert run_hours() == [DagRunState.SUCCESS] * HOURS
        assert len(orb.requests) == requests, "the same hours again sent nothing"
        assert orb.accepted_keys() == deliverable
