"""The ledger's connection: a postgres one (sqlite for the demo), never a warehouse's, refused with a
message naming ``ledger.conn_id`` before anything is read."""

from __future__ import annotations

import json

import pytest

from billing_airflow.operators.deliver import open_warehouse
from usage_billing.settings import ConfigError, parse_settings

WAREHOUSE_TYPES = {
    "redshift": {"conn_type": "redshift", "host": "cluster.example.redshift.amazonaws.com", "port": 5439,
                 "schema": "dev", "login": "billing", "password": "x"},
    "snowflake": {"conn_type": "snowflake", "login": "billing", "password": "x", "extra": {"account": "acme"}},
    "google_cloud_platform": {"conn_type": "google_cloud_platform", "extra": {"project": "acme"}},
}


def settings(source: str, ledger: str):
    return parse_settings({"source": {"conn_id": source, "schema": "prod_api", "events": ["api_call"]},
                           "ledger": {"conn_id": ledger},
                           "destinations": {"kable": {}}})


@pytest.fixture
def warehouse(tmp_path, monkeypatch) -> str:
    """An embedded SQLite warehouse as the source (``segment_warehouse``)."""
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_WAREHOUSE", json.dumps({"conn_type": "sqlite",
                                                                     "host": str(tmp_path / "wh.db")}))
    return "segment_warehouse"


@pytest.mark.parametrize("conn_type", list(WAREHOUSE_TYPES))
def test_a_ledger_on_a_warehouse_connection_is_refused_naming_ledger_conn_id(conn_type, warehouse, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_BILLING_LEDGER", json.dumps(WAREHOUSE_TYPES[conn_type]))
    with pytest.raises(ConfigError) as refused, open_warehouse(settings(warehouse, "billing_ledger")):
        pass
    message = str(refused.value)
    assert message.startswith("ledger.conn_id: connection 'billing_ledger' is of type"), message
    assert f"'{conn_type}'" in message and "needs a postgres connection" in message
    assert "advisory locks and enforced primary keys" in message


def test_a_redshift_source_cannot_host_its_own_ledger(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_REDSHIFT", json.dumps(WAREHOUSE_TYPES["redshift"]))
    with pytest.raises(ConfigError, match=r"ledger\.conn_id: the ledger needs a transactional database"), \
            open_warehouse(settings("segment_redshift", "segment_redshift")):
        pass


@pytest.mark.parametrize("ledger", [
    {"conn_type": "sqlite"},
    {"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "schema": "test", "login": "postgres"},
], ids=["sqlite", "postgres"])
def test_a_postgres_or_sqlite_ledger_is_accepted(ledger, warehouse, tmp_path, monkeypatch):
    if ledger["conn_type"] == "sqlite":
        ledger = {**ledger, "host": str(tmp_path / "ledger.db")}
    monkeypatch.setenv("AIRFLOW_CONN_BILLING_LEDGER", json.dumps(ledger))
    with open_warehouse(settings(warehouse, "billing_ledger")) as (source, book):
        assert source.kind.name == "postgres" and book.schema == "usage_billing"
