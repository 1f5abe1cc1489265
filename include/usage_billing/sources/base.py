"""The source contract: what the delivery core asks of a warehouse that holds Segment's track tables.

A source reads one partition of a window (or a list of message ids, for a replay) in bounded
chunks and hands the core pandas frames in one shape, whatever the warehouse:

* one row per Segment ``id`` (the most recently loaded copy), with a ``_copies`` column saying how
  many copies the scan held, and a ``_table`` column naming the event table;
* column names as Segment writes them on PostgreSQL (lower-case snake_case: ``user_id``,
  ``received_at``, ``context_traits_account_id``), whatever case the warehouse stores;
* timestamps as UTC-aware pandas timestamps, integers as ``Int64``, floats as ``Float64``, booleans
  as ``boolean``, text as ``string``; anything else (NUMERIC, JSON) as Python objects the mapping
  judges value by value.

Sources differ in how they read (a server-side cursor or ``COPY``, Arrow result batches, the
BigQuery Storage Read API) and in one declared capability: whether the ledger's "already delivered"
filter can run inside the extraction query (:attr:`SourceKind.ledger_join`), which is possible only
when the ledger lives in the same SQL database. Otherwise the core filters each chunk with one
batched ledger lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from usage_billing.sources.layout import Partition, Window

if TYPE_CHECKING:
    import pandas as pd
    import sqlalchemy as sa

    from usage_billing.settings import Settings

# "The ledger already knows this row": given the event table, a condition for the extraction query.
KnownFilter = Callable[["sa.Table"], "sa.ColumnElement[bool]"]


@dataclass(frozen=True)
class ReadRequest:
    """What to read: a partition's window (on ``loaded_at_column``, widened by the window's lookback)
    or, with ``ids``, those message ids.

    ``loaded_since`` bounds an id read from below on the loaded-at column (rows loaded at or after
    it), so it prunes like a window: the caller passes the earliest load the ledger recorded for the
    chosen events (a row loaded again later has a later loaded-at, so the bound never hides the copy
    that matters). None reads the ids whatever their load time: every partition is scanned."""

    partition: Partition
    window: Window | None
    columns: Sequence[str]
    loaded_at_column: str
    chunk_size: int
    ids: Sequence[str] | None = None
    # Only for sources whose kind declares ledger_join and that share the ledger's database.
    unknown_to_ledger: KnownFilter | None = None
    loaded_since: datetime | None = None


@dataclass
class QueryCost:
    """What the warehouse reported for a task's queries, for the summary a data engineer reads."""

    queries: int = 0
    bytes_processed: int | None = None
    rows_scanned: int | None = None
    query_ids: list[str] = field(default_factory=list)

    def add(self, bytes_processed: int | None = None, rows_scanned: int | None = None,
            query_id: str | None = None) -> None:
        self.queries += 1
        if bytes_processed is not None:
            self.bytes_processed = (self.bytes_processed or 0) + int(bytes_processed)
        if rows_scanned is not None:
            self.rows_scanned = (self.rows_scanned or 0) + int(rows_scanned)
        if query_id:
            self.query_ids.append(query_id)

    def render(self) -> str:
        parts = [f"{self.queries} queries"]
        if self.bytes_processed is not None:
            parts.append(f"{self.bytes_processed / 1e6:.1f} MB processed")
        if self.rows_scanned is not None:
            parts.append(f"{self.rows_scanned} rows scanned")
        if self.query_ids:
            shown = ", ".join(self.query_ids[:3])
            parts.append(f"query ids {shown}" + (f" (+{len(self.query_ids) - 3} more)" if len(self.query_ids) > 3
                                                 else ""))
        return ", ".join(parts)


class Source(Protocol):
    """One warehouse connection, opened for one task."""

    kind: SourceKind
    schema: str
    cost: QueryCost

    def table_columns(self, table: str) -> list[str] | None:
        """The event table's columns (Segment's lower-case names), or None when it does not exist."""

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield the requested rows in chunks of at most ``request.chunk_size``, in the shape above."""

    def count_rows(self, table: str, window: Window, loaded_at_column: str) -> int:
        """Rows (duplicates included) of a table in the window: cheap planning information."""

    def count_events(self, request: ReadRequest) -> int:
        """Distinct ids the request covers (used when the ledger filter left rows in the database)."""

    def shares_database_with(self, engine: object) -> bool:
        """True when ``engine`` (the ledger's) is this source's own SQL database."""

    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class SourceKind:
    """One warehouse kind, as the registry lists it (:mod:`usage_billing.sources`)."""

    name: str
    # Airflow connection types served by this kind (the connection's conn_type picks the kind).
    conn_types: tuple[str, ...]
    # Opens the source of a configuration (``settings.source``) for a task; imports its client and
    # provider lazily. It sees the whole configuration so a source that hosts the ledger can prepare
    # its connection for it.
    open: Callable[[Settings], Source]
    # Whether the ledger filter can run inside the extraction query (same SQL database only).
    ledger_join: bool = False
    # Whether the ledger may live in this warehouse (it needs primary keys and row locks).
    hosts_ledger: bool = False
    description: str = ""
