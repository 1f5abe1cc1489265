"""Airflow connection -> SQLAlchemy engine, for the SQL source and for the ledger.

Secrets stay in the Airflow connection: the URL is built in memory and never logged (SQLAlchemy
renders it with the password masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from usage_billing.naming import check_identifier
from usage_billing.settings_base import ConfigError

POSTGRES_TYPES = ("postgres", "postgresql", "redshift")
# What the ledger may live on: it needs transactions, advisory locks and enforced primary keys. A
# redshift connection speaks PostgreSQL's protocol but Redshift enforces no keys and has no advisory
# locks; Snowflake and BigQuery have neither. SQLite only for the embedded demo (one machine).
LEDGER_TYPES = ("postgres", "postgresql", "sqlite")


def sqlalchemy_url(conn_id: str) -> sa.URL:
    """A SQLAlchemy URL for an Airflow connection (PostgreSQL, Redshift-compatible, or SQLite).

    SQLite connections name the database file in ``host`` (``{"conn_type": "sqlite", "host": "/path/wh.db"}``).
    """
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    conn_type = (conn.conn_type or "").lower()
    if conn_type in POSTGRES_TYPES:
        return sa.URL.create("postgresql+psycopg2", username=conn.login or None, password=conn.password or None,
                             host=conn.host or None, port=conn.port or None, database=conn.schema or None)
    if conn_type == "sqlite":
        return sa.URL.create("sqlite", database=conn.host or conn.schema)
    raise ValueError(f"connection {conn_id!r}: conn_type {conn.conn_type!r} is not a SQL database this project "
                     f"reads (use postgres, or sqlite for the embedded warehouse)")


def ledger_url(conn_id: str) -> sa.URL:
    """The SQLAlchemy URL of the ledger's connection (``ledger.conn_id``), refused unless it is a
    postgres (or, for the demo, sqlite) connection."""
    conn_type = connection_type(conn_id)
    if conn_type not in LEDGER_TYPES:
        raise ConfigError(f"ledger.conn_id: connection {conn_id!r} is of type {conn_type or '(none)'!r}; the ledger "
                          f"needs a postgres connection (sqlite only for the embedded demo): it relies on "
                          f"transactions, advisory locks and enforced primary keys, which Redshift, Snowflake and "
                          f"BigQuery do not provide (a warehouse is only read)")
    return sqlalchemy_url(conn_id)


def connection_type(conn_id: str) -> str:
    """The Airflow connection's type, lower-case (it picks the source kind)."""
    from airflow.sdk import BaseHook

    return (BaseHook.get_connection(conn_id).conn_type or "").lower()


def _sqlite_attach(engine: Engine, database: Path, schemas: Sequence[str]) -> None:
    """SQLite has no schemas: attach one file per schema next to the main database."""

    @sa.event.listens_for(engine, "connect")
    def _attach(dbapi_connection, _record) -> None:  # pragma: no cover - exercised via SQLite tests
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        for schema in schemas:
            path = database.with_name(f"{database.stem}.{schema}{database.suffix or '.db'}")
            cursor.execute(f"ATTACH DATABASE ? AS \"{check_identifier(schema, 'schema')}\"", (str(path),))
        cursor.execute("PRAGMA journal_mode = WAL")
        for schema in schemas:
            cursor.execute(f'PRAGMA "{schema}".journal_mode = WAL')
        cursor.close()


def create_engine(url: str | sa.URL, schemas: Sequence[str] = ()) -> Engine:
    """An engine for a warehouse or ledger URL; on SQLite the named schemas are attached files."""
    url = sa.make_url(url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("the embedded SQLite warehouse needs a file path, not an in-memory database")
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        _sqlite_attach(engine, Path(url.database), schemas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8)
