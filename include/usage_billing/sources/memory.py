"""An in-memory source: Segment track tables as pandas frames, for the core's unit tests and demos.

It applies the same window, duplicate and chunking rules as the warehouse readers (one row per
``id``, the most recently loaded copy, ``_copies`` counted), so the core can be tested without a
database. It cannot run the ledger filter inside a query (``ledger_join=False``).
"""

from __future__ import annotations

from collections.abc import Iterator

from usage_billing.frames import pd
from usage_billing.sources.base import QueryCost, ReadRequest, SourceKind
from usage_billing.sources.layout import COPIES, TABLE, Window


class MemorySource:
    """``tables`` maps an event table name to its rows (Segment's lower-case column names)."""

    def __init__(self, tables: dict[str, pd.DataFrame], schema: str = "memory"):
        self.tables = tables
        self.schema = schema
        self.kind = KIND
        self.cost = QueryCost()

    def table_columns(self, table: str) -> list[str] | None:
        frame = self.tables.get(table)
        return None if frame is None else list(frame.columns)

    def _rows(self, request: ReadRequest) -> pd.DataFrame:
        frame = self.tables[request.partition.table]
        if request.ids is not None:
            frame = frame[frame["id"].isin(list(request.ids))]
            if request.loaded_since is not None:
                frame = frame[frame[request.loaded_at_column] >= pd.Timestamp(request.loaded_since)]
        else:
            assert request.window is not None
            loaded = frame[request.loaded_at_column]
            frame = frame[(loaded >= request.window.scan_start) & (loaded < request.window.end)]
        if request.partition.buckets > 1:
            buckets = pd.util.hash_pandas_object(frame["id"], index=False) % request.partition.buckets
            frame = frame[buckets.to_numpy() == request.partition.bucket]
        copies = frame.groupby("id")["id"].transform("size")
        latest = frame.assign(**{COPIES: copies}).sort_values(request.loaded_at_column, ascending=False)
        return latest.drop_duplicates("id").sort_values(["id"]).reset_index(drop=True)

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        self.cost.add()
        rows = self._rows(request)
        wanted = [c for c in dict.fromkeys(request.columns) if c in rows.columns]
        for start in range(0, len(rows), request.chunk_size):
            chunk = rows.iloc[start:start + request.chunk_size][[*wanted, COPIES]].reset_index(drop=True)
            chunk[TABLE] = request.partition.table
            yield chunk

    def count_rows(self, table: str, window: Window, loaded_at_column: str) -> int:
        loaded = self.tables[table][loaded_at_column]
        return int(((loaded >= window.scan_start) & (loaded < window.end)).sum())

    def count_events(self, request: ReadRequest) -> int:
        return len(self._rows(request))

    def shares_database_with(self, engine: object) -> bool:
        return False

    def close(self) -> None:
        pass


KIND = SourceKind(name="memory", conn_types=(), open=lambda settings: MemorySource({}, settings.source.schema_),
                  description="pandas frames in memory (tests and demos)")
