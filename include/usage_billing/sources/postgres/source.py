"""The SQL source over one SQLAlchemy engine: what the delivery core reads PostgreSQL (or SQLite) through."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from usage_billing.sources.base import QueryCost, ReadRequest, SourceKind
from usage_billing.sources.layout import Window
from usage_billing.sources.postgres import KIND, reader

if TYPE_CHECKING:
    import pandas as pd


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
