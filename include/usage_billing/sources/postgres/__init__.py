"""Segment's track tables in PostgreSQL (or SQLite, for the embedded demo), read with SQLAlchemy.

Segment's PostgreSQL layout: one schema per Segment source, one table per event, lower-case
snake_case columns, ``timestamp with time zone`` timestamps, ``received_at`` / ``uuid_ts`` saying
when a row arrived (see the README's warehouse table). When the ledger lives in the same database
(the default), the "already delivered" filter is a ``NOT EXISTS`` inside the extraction query, so
delivered rows never leave the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pandas as pd
from sqlalchemy.engine import Engine

from usage_billing.sources.base import QueryCost, ReadRequest, SourceKind
from usage_billing.sources.layout import Window
from usage_billing.sources.postgres import reader
from usage_billing.sources.postgres.connection import create_engine, sqlalchemy_url

if TYPE_CHECKING:
    from usage_billing.settings import Settings

__all__ = ["KIND", "SqlSource", "create_engine", "sqlalchemy_url"]


class SqlSource:
    """The SQL source over one engine; :attr:`engine` may also be the ledger's."""

    def __init__(self, engine: Engine, schema: str, kind: SourceKind | None = None):
        self.engine = engine
        self.schema = schema
        self.kind = kind or KIND
        self.cost = QueryCost()

    def table_columns(self, table: str) -> list[str] | None:
        with self.engine.connect() as conn:
            return reader.table_columns(conn, self.schema, table)

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        # The chunks are read from one connection, closed after the reader (which cancels an
        # unfinished COPY) when the consumer closes this generator.
        self.cost.add()
        with self.engine.connect() as conn:
            yield from reader.read_events(conn, self.schema, request)

    def count_rows(self, table: str, window: Window, loaded_at_column: str) -> int:
        with self.engine.connect() as conn:
            return reader.count_window(conn, self.schema, table, window, loaded_at_column)

    def count_events(self, request: ReadRequest) -> int:
        with self.engine.connect() as conn:
            return reader.count_events(conn, self.schema, request)

    def shares_database_with(self, engine: object) -> bool:
        return engine is self.engine

    def close(self) -> None:
        self.engine.dispose()


def open_sql_source(settings: Settings) -> SqlSource:
    """The source of ``source.conn_id`` (a postgres or sqlite connection). SQLite has no schemas:
    the ledger's schema is attached too, in case the ledger shares this database."""
    source = settings.source
    schemas = [source.schema_, settings.ledger.schema_]
    return SqlSource(create_engine(sqlalchemy_url(source.conn_id), schemas), source.schema_)


KIND = SourceKind(name="postgres", conn_types=("postgres", "postgresql", "sqlite"), open=open_sql_source,
                  ledger_join=True, hosts_ledger=True,
                  description="PostgreSQL (SQLite for the embedded demo): COPY into pandas, ledger filter in-database")
