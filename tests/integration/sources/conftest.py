"""Warehouse stand-ins for the source conformance tests, each reached through its real client.

* Snowflake: fakesnow's server (DuckDB behind Snowflake's HTTP protocol) on loopback, over TLS with a
  throwaway certificate, because the Airflow SnowflakeHook never passes ``protocol`` to the connector:
  the tests go through ``SnowflakeHook.get_conn()`` exactly as production does.
* BigQuery: bqemulator (REST + Storage Read gRPC on DuckDB) in its own environment
  (``.venv-bqemulator``, from ``requirements-bqemulator.lock``), started offline.
* Redshift: no stand-in exists; the Redshift source's SQL runs on the test PostgreSQL and every
  statement it sends is parsed with sqlglot's Redshift dialect.

Each harness loads the same rows :mod:`usage_billing.sample_data` generates into its warehouse, laid
out the way Segment lays them out there, and opens the source under test on them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from usage_billing import sample_data
from usage_billing.sandbox import warehouses

PROJECT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kinds(slug: str) -> list[tuple[str, str]]:
    """The event table's columns as (Segment name, Segment warehouse type)."""
    return list(sample_data.BASE_COLUMNS) + [(p.column, p.kind) for p in sample_data.EVENTS[slug].properties]


def utc_text(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


# --------------------------------------------------------------------------------------------------
# Snowflake: fakesnow server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fakesnow_server(fakesnow) -> int:
    """The port of the session's fakesnow server (``tests/conftest.py``: TLS, ``REQUESTS_CA_BUNDLE`` set)."""
    return fakesnow.port


SNOWFLAKE_TYPES = {"string": "VARCHAR(512)", "integer": "NUMBER(38,0)", "float": "FLOAT", "boolean": "BOOLEAN",
                   "timestamp": "TIMESTAMP_TZ"}


class SnowflakeHarness:
    """Segment's Snowflake layout on fakesnow: database SEGMENT_EVENTS, a schema per source, a table per
    event, names created unquoted (so stored upper-case); ``quoted_lower`` creates them quoted instead."""

    name = "snowflake"
    conn_id = "segment_snowflake"
    extra_columns: tuple[str, ...] = ()

    def __init__(self, port: int, monkeypatch: pytest.MonkeyPatch, quoted_lower: bool = False,
                 timestamp_type: str = "TIMESTAMP_TZ"):
        self.quoted_lower = quoted_lower
        self.timestamp_type = timestamp_type
        self.database = f"segment_events_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(f"AIRFLOW_CONN_{self.conn_id.upper()}", json.dumps({
            "conn_type": "snowflake", "login": "segment_reader", "password": "not-a-secret",
            "extra": {"account": "fakesnow", "database": self.database, "warehouse": "billing_wh",
                      "host": "127.0.0.1", "port": port,
                      "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False}}}))

    def connect(self):
        from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook

        return SnowflakeHook(snowflake_conn_id=self.conn_id).get_conn()

    def ident(self, name: str) -> str:
        return f'"{name}"' if self.quoted_lower else f'"{name.upper()}"'

    def create(self, schema: str, table: str, columns: Sequence[tuple[str, str]]) -> None:
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
            cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {self.database}.{self.ident(schema)}")
            types = {**SNOWFLAKE_TYPES, "timestamp": self.timestamp_type}
            ddl = ", ".join(f"{self.ident(name)} {types.get(kind, kind)}" for name, kind in columns)
            cursor.execute(f"CREATE TABLE {self.database}.{self.ident(schema)}.{self.ident(table)} ({ddl})")

    def insert(self, schema: str, table: str, names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cursor:
            target = f"{self.database}.{self.ident(schema)}.{self.ident(table)}"
            columns = ", ".join(self.ident(n) for n in names)
            values = ", ".join(["%s"] * len(names))
            cursor.executemany(f"INSERT INTO {target} ({columns}) VALUES ({values})",
                               [tuple(utc_text(row.get(n)) for n in names) for row in rows])

    def load(self, schema: str, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        for slug, batch in rows.items():
            columns = kinds(slug)
            self.create(schema, slug, columns)
            if batch:
                self.insert(schema, slug, [n for n, _ in columns], batch)

    def open(self, schema: str):
        from usage_billing.settings import SourceSettings
        from usage_billing.sources import kind_for

        settings = SourceSettings.model_validate({"conn_id": self.conn_id, "schema": schema, "events": ["api_call"]})
        return kind_for("snowflake").open(settings)


@pytest.fixture(scope="module")
def snowflake(fakesnow_server) -> Iterator[SnowflakeHarness]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield SnowflakeHarness(fakesnow_server, monkeypatch)


# --------------------------------------------------------------------------------------------------
# BigQuery: bqemulator in its own environment
# --------------------------------------------------------------------------------------------------

BQ_PROJECT = warehouses.BQ_PROJECT


@pytest.fixture(scope="session")
def bqemulator_server(bqemulator) -> dict[str, str]:
    """The endpoints of the session's bqemulator (``tests/conftest.py``)."""
    return bqemulator.endpoints


BIGQUERY_TYPES = {"string": "STRING", "integer": "INTEGER", "float": "FLOAT", "boolean": "BOOLEAN",
                  "timestamp": "TIMESTAMP"}


class BigQueryHarness:
    """Segment's BigQuery layout on bqemulator: a dataset per source, a day-partitioned (ingestion time)
    table per event, lower-case columns plus ``loaded_at`` (set to the row's ``uuid_ts`` here)."""

    name = "bigquery"
    conn_id = "segment_bigquery"
    extra_columns = ("loaded_at",)

    def __init__(self, endpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                 maximum_bytes_billed: int = 10 * 2**30):
        self.endpoints = endpoints
        self.maximum_bytes_billed = maximum_bytes_billed
        monkeypatch.setenv(f"AIRFLOW_CONN_{self.conn_id.upper()}", json.dumps({
            "conn_type": "google_cloud_platform",
            "extra": {"project": BQ_PROJECT, "is_anonymous": True, "results_dataset": "usage_billing_results",
                      **endpoints}}))

    def client(self):
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(project=BQ_PROJECT, credentials=AnonymousCredentials(),
                               client_options=ClientOptions(api_endpoint=self.endpoints["api_endpoint"]))

    def create(self, schema: str, table: str, columns: Sequence[tuple[str, str]]) -> None:
        from google.cloud import bigquery

        client = self.client()
        client.create_dataset(schema, exists_ok=True)
        fields = [bigquery.SchemaField(name, BIGQUERY_TYPES.get(kind, kind)) for name, kind in columns]
        if any(name == "uuid_ts" for name, _ in columns):
            fields.append(bigquery.SchemaField("loaded_at", "TIMESTAMP"))
        definition = bigquery.Table(f"{BQ_PROJECT}.{schema}.{table}", schema=fields)
        definition.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY)
        client.create_table(definition)
        client.close()

    def insert(self, schema: str, table: str, names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        def value(v: Any) -> Any:
            return v.astimezone(dt.UTC).isoformat() if isinstance(v, dt.datetime) else v

        client = self.client()
        payload = []
        for row in rows:
            record = {n: value(row.get(n)) for n in names}
            if "uuid_ts" in record:
                record["loaded_at"] = record["uuid_ts"]
            payload.append(record)
        for start in range(0, len(payload), 5_000):
            errors = client.insert_rows_json(f"{BQ_PROJECT}.{schema}.{table}", payload[start:start + 5_000])
            assert not errors, errors[:3]
        client.close()

    def load(self, schema: str, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        for slug, batch in rows.items():
            columns = kinds(slug)
            self.create(schema, slug, columns)
            if batch:
                self.insert(schema, slug, [n for n, _ in columns], batch)

    def open(self, schema: str):
        from usage_billing.settings import SourceSettings
        from usage_billing.sources import kind_for

        settings = SourceSettings.model_validate({"conn_id": self.conn_id, "schema": schema, "events": ["api_call"],
                                                  "maximum_bytes_billed": self.maximum_bytes_billed})
        return kind_for("google_cloud_platform").open(settings)


@pytest.fixture(scope="module")
def bigquery(bqemulator_server) -> Iterator[BigQueryHarness]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield BigQueryHarness(bqemulator_server, monkeypatch, maximum_bytes_billed=10 * 2**30)


# --------------------------------------------------------------------------------------------------
# Redshift: its SQL on PostgreSQL
# --------------------------------------------------------------------------------------------------

REDSHIFT_TYPES = {"string": "VARCHAR(512)", "integer": "BIGINT", "float": "DOUBLE PRECISION", "boolean": "BOOLEAN",
                  "timestamp": "TIMESTAMP"}
# Redshift's FNV_HASH does not exist on PostgreSQL: a stand-in with the same signature, so the bucket
# query runs. It proves the buckets partition the ids, not that Redshift's hash values match.
FNV_HASH_SHIM = "CREATE OR REPLACE FUNCTION public.fnv_hash(text) RETURNS bigint LANGUAGE sql IMMUTABLE " \
                "AS $$ SELECT hashtextextended($1, 0) $$"


class RedshiftHarness:
    """Segment's Redshift layout on the test PostgreSQL: a schema per source, a table per event,
    lower-case columns, TIMESTAMP without time zone holding UTC, no keys."""

    name = "redshift"
    conn_id = "segment_redshift"
    extra_columns: tuple[str, ...] = ()

    def __init__(self, pg_url: str, monkeypatch: pytest.MonkeyPatch):
        import sqlalchemy as sa

        url = sa.make_url(pg_url)
        self.dsn = dict(host=url.host, port=url.port or 5432, dbname=url.database, user=url.username,
                        password=url.password)
        self.schemas: list[str] = []
        monkeypatch.setenv(f"AIRFLOW_CONN_{self.conn_id.upper()}", json.dumps({
            "conn_type": "redshift", "host": url.host, "port": url.port or 5432, "schema": url.database,
            "login": url.username, "password": url.password, "extra": {"sslmode": "disable"}}))
        with self.connect() as conn, conn.cursor() as cursor:
            cursor.execute(FNV_HASH_SHIM)

    def connect(self):
        import psycopg2

        return contextlib.closing(_autocommit(psycopg2.connect(**self.dsn)))

    def create(self, schema: str, table: str, columns: Sequence[tuple[str, str]]) -> None:
        ddl = ", ".join(f'"{name}" {REDSHIFT_TYPES.get(kind, kind)}' for name, kind in columns)
        with self.connect() as conn, conn.cursor() as cursor:
            cursor.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            cursor.execute(f'CREATE TABLE "{schema}"."{table}" ({ddl})')
        self.schemas.append(schema)

    def insert(self, schema: str, table: str, names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        from psycopg2.extras import execute_values

        columns = ", ".join(f'"{n}"' for n in names)
        with self.connect() as conn, conn.cursor() as cursor:
            execute_values(cursor, f'INSERT INTO "{schema}"."{table}" ({columns}) VALUES %s',
                           [tuple(utc_text(row.get(n)) for n in names) for row in rows], page_size=2000)

    def load(self, schema: str, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        for slug, batch in rows.items():
            columns = kinds(slug)
            self.create(schema, slug, columns)
            if batch:
                self.insert(schema, slug, [n for n, _ in columns], batch)

    def open(self, schema: str):
        from usage_billing.settings import SourceSettings
        from usage_billing.sources import kind_for

        settings = SourceSettings.model_validate({"conn_id": self.conn_id, "schema": schema, "events": ["api_call"]})
        return kind_for("redshift").open(settings)

    def drop(self) -> None:
        with self.connect() as conn, conn.cursor() as cursor:
            for schema in dict.fromkeys(self.schemas):
                cursor.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _autocommit(conn):
    conn.autocommit = True
    return conn


@pytest.fixture(scope="module")
def redshift(pg_url) -> Iterator[RedshiftHarness]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        harness = RedshiftHarness(pg_url, monkeypatch)
        yield harness
        harness.drop()


@pytest.fixture(scope="module", params=["snowflake", "bigquery", "redshift"])
def harness(request):
    """The conformance harness: every test using it runs once per emulated warehouse."""
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------------------------------
# Delivery: an emulated warehouse as a task's source (tests/integration/sources/test_delivery_warehouses.py,
# tests/e2e/test_warehouse_dags.py)
# --------------------------------------------------------------------------------------------------


@dataclass
class Warehouse:
    """One emulated warehouse holding one Segment source's event tables."""

    kind: str
    conn_id: str
    schema: str
    loaded_at_column: str
    load: Any  # (rows by table) -> None; appends

    def loaded_at(self, row: Mapping[str, Any]) -> dt.datetime:
        # bqemulator's loaded_at is the row's uuid_ts (warehouses.load_bigquery)
        return row["uuid_ts"] if self.loaded_at_column == "loaded_at" else row[self.loaded_at_column]


def emulated_warehouse(kind: str, request: pytest.FixtureRequest, schema: str, pg_url: str,
                       monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    """An empty emulated warehouse of ``kind`` for one Segment source (``schema``), its Airflow connection set.

    Snowflake gets a database of its own on the session's fakesnow server, BigQuery a dataset on the
    session's bqemulator, Redshift a schema in the test PostgreSQL (drop it with the ``schemas`` fixture)."""
    if kind == "snowflake":
        server = request.getfixturevalue("fakesnow")
        monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_SNOWFLAKE", json.dumps(warehouses.snowflake_connection(
            server.port, f"segment_events_{uuid.uuid4().hex[:8]}")))
        return Warehouse(kind, "segment_snowflake", schema, "received_at",
                         lambda rows: warehouses.load_snowflake("segment_snowflake", schema, rows))
    if kind == "bigquery":
        emulator = request.getfixturevalue("bqemulator")
        monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_BIGQUERY", json.dumps(warehouses.bigquery_connection(emulator)))
        # The one warehouse where Segment writes loaded_at, which the README advises as the loaded-at column.
        return Warehouse(kind, "segment_bigquery", schema, "loaded_at",
                         lambda rows: warehouses.load_bigquery(emulator, schema, rows))
    harness = RedshiftHarness(pg_url, monkeypatch)
    created: set[str] = set()

    def load(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        for table, batch in rows.items():
            if table not in created:
                harness.create(schema, table, kinds(table))
                created.add(table)
            if batch:
                harness.insert(schema, table, [name for name, _ in kinds(table)], batch)

    return Warehouse(kind, harness.conn_id, schema, "received_at", load)


__all__ = ["PROJECT", "free_port", "kinds", "subprocess", "sys", "utc_text"]
