"""Local stand-ins for the warehouses Segment loads, for the demo, the benchmark and the tests.

* Snowflake: fakesnow's HTTP app (DuckDB behind Snowflake's wire protocol) under uvicorn in a thread of
  this process, over TLS with a throwaway certificate: the Airflow ``SnowflakeHook`` never passes
  ``protocol`` to the connector, so plain HTTP would need a bypass of the hook. The connector trusts
  the certificate through ``REQUESTS_CA_BUNDLE``, which :func:`fakesnow_server` sets while it runs.
* BigQuery: bqemulator (REST + Storage Read gRPC on DuckDB) as a subprocess from its own environment
  (``.venv-bqemulator``: its sqlglot and DuckDB pins conflict with fakesnow's), started offline with a
  ``HOME`` whose DuckDB extension directory holds the ``duckdb-extension-spatial`` wheel's extension.

The loaders lay the sample rows (:mod:`usage_billing.sample_data`) out as Segment does on each warehouse:
Snowflake tables created with unquoted DDL (names stored upper-case), BigQuery day-partitioned tables
with a ``loaded_at`` column. Neither emulator says anything about the real service's speed or cost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usage_billing import sample_data

PROJECT = Path(__file__).resolve().parents[3]
BQEMULATOR_VENV = Path(os.environ.get("BQEMULATOR_VENV", PROJECT / ".venv-bqemulator"))
BQ_PROJECT = "segment-billing-local"

__all__ = [
    "BQEMULATOR_VENV",
    "BQ_PROJECT",
    "BigQueryEmulator",
    "EmulatorNotInstalled",
    "EmulatorUnavailable",
    "FakesnowServer",
    "bigquery_connection",
    "bqemulator_server",
    "fakesnow_server",
    "free_port",
    "load_bigquery",
    "load_snowflake",
    "snowflake_connection",
]


class EmulatorUnavailable(RuntimeError):
    """The emulator cannot run here: not installed, or installed but broken (the message says why)."""


class EmulatorNotInstalled(EmulatorUnavailable):
    """The emulator is simply not installed here (the message says how to install it); the test
    suite skips what needs it. Anything else that stops an emulator is a failure."""


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _columns(slug: str) -> list[tuple[str, str]]:
    """The event table's columns as (Segment name, Segment warehouse type)."""
    return list(sample_data.BASE_COLUMNS) + [(p.column, p.kind) for p in sample_data.EVENTS[slug].properties]


def _utc_text(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


# --------------------------------------------------------------------------------------------------
# Snowflake: fakesnow's server
# --------------------------------------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (also its own CA bundle) and its key, written to ``directory``."""
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
    return directory / "cert.pem", directory / "key.pem"


@dataclass(frozen=True)
class FakesnowServer:
    port: int
    ca_bundle: Path


@contextlib.contextmanager
def fakesnow_server(timeout: float = 30.0) -> Iterator[FakesnowServer]:
    """fakesnow's app under uvicorn with TLS on a loopback port; ``REQUESTS_CA_BUNDLE`` trusts it meanwhile.

    Child processes inherit the variable, so a task run in a subprocess reaches the same server."""
    import importlib
    import importlib.util

    missing = [name for name in ("fakesnow", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise EmulatorNotInstalled(f"{' and '.join(missing)} not installed; run make .venv/.synced")
    try:
        import uvicorn

        # fakesnow.server is both a module (the ASGI app) and a function the package exports.
        fakesnow_app = importlib.import_module("fakesnow.server")
    except ImportError as error:  # installed, but broken (e.g. a connector version it cannot drive)
        raise EmulatorUnavailable(f"fakesnow is installed but does not import: {error}") from error
    directory = Path(tempfile.mkdtemp(prefix="fakesnow-tls-"))
    cert, key = self_signed_certificate(directory)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fakesnow_app.app, host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(cert), ssl_keyfile=str(key),
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, name="fakesnow", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise EmulatorUnavailable("the fakesnow server did not start")
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(cert)
    try:
        yield FakesnowServer(port, cert)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if previous is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = previous


def snowflake_connection(port: int, database: str) -> dict[str, Any]:
    """An Airflow ``snowflake`` connection (as AIRFLOW_CONN_ JSON) reaching the local fakesnow server.

    fakesnow accepts any credentials; telemetry is off so the connector sends nothing elsewhere."""
    return {"conn_type": "snowflake", "login": "segment_reader", "password": "not-a-secret",
            "extra": {"account": "fakesnow", "database": database, "warehouse": "billing_wh",
                      "host": "127.0.0.1", "port": port,
                      "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False}}}


SNOWFLAKE_TYPES = {"string": "VARCHAR(512)", "integer": "NUMBER(38,0)", "float": "FLOAT", "boolean": "BOOLEAN",
                   "timestamp": "TIMESTAMP_TZ"}


def load_snowflake(conn_id: str, schema: str, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Create (unquoted DDL, as Segment: names stored upper-case) and fill the event tables of a schema in
    the connection's database.

    Rows go through ``COPY INTO`` from a Parquet file, as Segment loads Snowflake from a stage:
    fakesnow runs ``INSERT`` at a few hundred rows a second, ``COPY`` at a hundred thousand. The file is
    a local path, so this works only for a server on this machine (which :func:`fakesnow_server` is)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook

    arrow_types = {"string": pa.string(), "integer": pa.int64(), "float": pa.float64(), "boolean": pa.bool_(),
                   "timestamp": pa.timestamp("us", tz="UTC")}
    hook = SnowflakeHook(snowflake_conn_id=conn_id)
    database = hook.get_connection(conn_id).extra_dejson["database"]
    with contextlib.closing(hook.get_conn()) as conn, conn.cursor() as cursor, \
            tempfile.TemporaryDirectory(prefix="segment-load-") as directory:
        cursor.execute(f"CREATE DATABASE IF NOT EXISTS {database}")
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {database}.{schema}")
        for slug, table_rows in rows.items():
            columns = _columns(slug)
            target = f"{database}.{schema}.{slug}"
            ddl = ", ".join(f"{name} {SNOWFLAKE_TYPES[kind]}" for name, kind in columns)
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {target} ({ddl})")
            if not table_rows:
                continue
            name = f"{slug}-{time.monotonic_ns()}.parquet"
            pq.write_table(pa.table({column.upper(): pa.array([row.get(column) for row in table_rows],
                                                              type=arrow_types[kind])
                                     for column, kind in columns}), f"{directory}/{name}")
            cursor.execute(f"COPY INTO {target} FROM 'file://{directory}/' FILES=('{name}') "
                           f"FILE_FORMAT=(TYPE=PARQUET) MATCH_BY_COLUMN_NAME=CASE_INSENSITIVE")


# --------------------------------------------------------------------------------------------------
# BigQuery: bqemulator in its own environment
# --------------------------------------------------------------------------------------------------


def bqemulator_home(venv: Path, directory: Path) -> Path:
    """A HOME whose DuckDB extension directory holds the spatial extension of the
    duckdb-extension-spatial wheel, so the emulator's ``INSTALL spatial`` finds it and never downloads."""
    wheels = list(venv.glob("lib/python3*/site-packages/duckdb_extension_spatial/extensions/v*/"
                            "spatial.duckdb_extension"))
    if not wheels:
        raise EmulatorUnavailable(f"{venv}: duckdb-extension-spatial is not installed (make .venv-bqemulator/.synced "
                                  f"installs requirements-bqemulator.lock)")
    target = directory / ".duckdb" / "extensions" / wheels[0].parent.name / "linux_amd64"
    target.mkdir(parents=True, exist_ok=True)
    link = target / "spatial.duckdb_extension"
    if not link.exists():
        link.symlink_to(wheels[0])
    return directory


@dataclass(frozen=True)
class BigQueryEmulator:
    project: str
    api_endpoint: str
    read_api_endpoint: str
    log: Path

    @property
    def endpoints(self) -> dict[str, str]:
        return {"api_endpoint": self.api_endpoint, "read_api_endpoint": self.read_api_endpoint}


@contextlib.contextmanager
def bqemulator_server(project: str = BQ_PROJECT, venv: Path = BQEMULATOR_VENV,
                      timeout: float = 60.0) -> Iterator[BigQueryEmulator]:
    """bqemulator (REST and Storage Read gRPC) on loopback ports, offline, in memory; stopped afterwards."""
    executable = venv / "bin" / "bqemulator"
    if not executable.exists():
        raise EmulatorNotInstalled(f"bqemulator is not installed at {venv} (make .venv-bqemulator/.synced creates it "
                                  f"from requirements-bqemulator.lock)")
    directory = Path(tempfile.mkdtemp(prefix="bqemulator-"))
    home = bqemulator_home(venv, directory)
    rest, grpc_port = free_port(), free_port()
    env = {**os.environ, "HOME": str(home), "OTEL_SDK_DISABLED": "true", "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false"}
    log_path = directory / "bqemulator.log"
    command = [str(executable), "start", "--rest-host", "127.0.0.1", "--rest-port", str(rest),
               "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--ephemeral", "--project", project,
               "--log-level", "warning"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        import requests

        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise EmulatorUnavailable(f"bqemulator exited: {log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{rest}/bigquery/v2/projects/{project}/datasets", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise EmulatorUnavailable(f"bqemulator did not answer within {timeout:.0f} s")
            time.sleep(0.2)
        yield BigQueryEmulator(project, f"http://127.0.0.1:{rest}", f"http://127.0.0.1:{grpc_port}", log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def bigquery_connection(emulator: BigQueryEmulator) -> dict[str, Any]:
    """An Airflow ``google_cloud_platform`` connection (as AIRFLOW_CONN_ JSON) reaching the emulator."""
    return {"conn_type": "google_cloud_platform",
            "extra": {"project": emulator.project, "is_anonymous": True, "results_dataset": "usage_billing_results",
                      **emulator.endpoints}}


BIGQUERY_TYPES = {"string": "STRING", "integer": "INTEGER", "float": "FLOAT", "boolean": "BOOLEAN",
                  "timestamp": "TIMESTAMP"}


def load_bigquery(emulator: BigQueryEmulator, dataset: str, rows: Mapping[str, Sequence[Mapping[str, Any]]],
                  create: bool = True, batch: int = 5_000) -> None:
    """Create (day-partitioned by ingestion time, as Segment) and fill the event tables of a dataset;
    ``loaded_at`` is the row's ``uuid_ts`` (when it was loaded)."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    client = bigquery.Client(project=emulator.project, credentials=AnonymousCredentials(),
                             client_options=ClientOptions(api_endpoint=emulator.api_endpoint))
    try:
        if create:
            client.create_dataset(dataset, exists_ok=True)
        for slug, table_rows in rows.items():
            columns = _columns(slug)
            table_id = f"{emulator.project}.{dataset}.{slug}"
            if create:
                fields = [bigquery.SchemaField(name, BIGQUERY_TYPES[kind]) for name, kind in columns]
                fields.append(bigquery.SchemaField("loaded_at", "TIMESTAMP"))
                definition = bigquery.Table(table_id, schema=fields)
                definition.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY)
                client.create_table(definition, exists_ok=True)
            payload = []
            for row in table_rows:
                record = {name: _json_value(row.get(name)) for name, _ in columns}
                record["loaded_at"] = record["uuid_ts"]
                payload.append(record)
            for start in range(0, len(payload), batch):
                errors = client.insert_rows_json(table_id, payload[start:start + batch])
                if errors:
                    raise RuntimeError(f"bqemulator refused rows of {table_id}: {json.dumps(errors[:3])}")
    finally:
        client.close()


def _json_value(value: Any) -> Any:
    return value.astimezone(dt.UTC).isoformat() if isinstance(value, dt.datetime) else value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m usage_billing.sandbox.warehouses fakesnow``: the fakesnow server in a process of its own
    (so a benchmark does not share its GIL); prints ``{"port": …, "ca_bundle": …}`` once it listens and
    runs until SIGTERM."""
    import signal
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["fakesnow"]:
        print("usage: python -m usage_billing.sandbox.warehouses fakesnow", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with fakesnow_server() as server:
        print(json.dumps({"port": server.port, "ca_bundle": str(server.ca_bundle)}), flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
