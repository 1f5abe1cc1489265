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
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from usage_billing import sample_data

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


def _self_signed(directory: Path) -> Path:
    """A certificate for 127.0.0.1 and its key; returns the certificate (also the CA bundle)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return directory / "cert.pem"


@pytest.fixture(scope="session")
def fakesnow_server() -> Iterator[int]:
    """fakesnow's HTTP app under uvicorn with TLS on a loopback port (what ``fakesnow.server()`` does,
    plus a certificate); the connector trusts it through ``REQUESTS_CA_BUNDLE``."""
    fakesnow_server_module = pytest.importorskip("fakesnow.server", reason="fakesnow is not installed")
    import uvicorn

    directory = Path(tempfile.mkdtemp(prefix="fakesnow-tls-"))
    cert = _self_signed(directory)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fakesnow_server_module.app, host="127.0.0.1", port=port,
                                           log_level="warning", ssl_certfile=str(cert),
                                           ssl_keyfile=str(directory / "key.pem")))
    thread = threading.Thread(target=server.run, name="fakesnow", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        pytest.fail("fakesnow server did not start")
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(cert)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if previous is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = previous


SNOWFLAKE_TYPES = {"string": "VARCHAR(512)", "integer": "NUMBER(38,0)", "float": "FLOAT", "boolean": "BOOLEAN",
                   "timestamp": "TIMESTAMP_TZ"}


class SnowflakeHarness:
    """Segment's Snowflake layout on fakesnow: database SEGMENT_EVENTS, a schema per source, a table per
    event, names created unquoted (so stored upper-case); ``quoted_lower`` creates them quoted instead."""

    name = "snowflake"
    conn_id = "segment_snowflake"

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


@pytest.fixture(scope="module", params=["snowflake"])
def harness(request):
    """The conformance harness: every test using it runs once per emulated warehouse."""
    return request.getfixturevalue(request.param)


__all__ = ["PROJECT", "free_port", "kinds", "subprocess", "sys", "utc_text"]
