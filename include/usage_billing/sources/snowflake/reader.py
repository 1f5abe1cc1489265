"""Segment's track tables on Snowflake, read as Arrow result batches.

Segment's Snowflake layout (https://segment.com/docs/connections/storage/catalog/snowflake/): a
database of its own (``SEGMENT_EVENTS`` in the docs, set on the Airflow connection), a schema per
Segment source and a table per event. Segment creates them with unquoted DDL, and Snowflake folds
unquoted identifiers to upper case: ``PROD_API.API_CALL.RECEIVED_AT``. The docs never say so, so names
are resolved case-insensitively through ``INFORMATION_SCHEMA`` (a table created with quoted lower-case
names reads the same), always quoted as found, and aliased back to Segment's lower-case names in the
query: the rest of the pipeline never sees Snowflake's case. Timestamps may be TIMESTAMP_TZ, _LTZ or
_NTZ (undocumented too): the session runs in UTC, window bounds are cast to the column's own type, and
values arrive UTC-aware.

One query per read: the window prunes on the loaded-at column (Snowflake skips micro-partitions whose
min/max miss the range), ``QUALIFY ROW_NUMBER()`` keeps the most recently loaded copy of each id and
``COUNT(*) OVER`` counts the copies, so duplicates never leave the warehouse. Results come back with
``fetch_arrow_batches()`` (Arrow, no Python object per value) and are re-cut to ``chunk_size``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from usage_billing.frames import pd
from usage_billing.naming import check_identifier
from usage_billing.sources import arrow
from usage_billing.sources.base import QueryCost, ReadRequest, SourceKind
from usage_billing.sources.layout import COPIES, Window
from usage_billing.sources.params import ids_in

log = logging.getLogger(__name__)

# Ids per query when replaying a list of ids: far below Snowflake's limit on expressions in a list.
IDS_PER_QUERY = 1_000
_TIMESTAMP_TYPES = {"TIMESTAMP_TZ", "TIMESTAMP_LTZ", "TIMESTAMP_NTZ"}


def quote(name: str) -> str:
    """A Snowflake identifier quoted exactly as it exists (names come from INFORMATION_SCHEMA)."""
    return '"' + name.replace('"', '""') + '"'


def _bound(value: datetime) -> str:
    # Offset-less UTC text: the session time zone is UTC, so TIMESTAMP_TZ/LTZ read it as UTC and
    # TIMESTAMP_NTZ (Segment writes UTC wall time) compares it as is.
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class EventTable:
    """An event table as Snowflake stores it: its real schema and table names and columns by Segment name."""

    def __init__(self, schema: str, name: str, columns: dict[str, tuple[str, str]]):
        self.schema = schema
        self.name = name
        # Segment's lower-case name -> (name as stored, Snowflake data type)
        self.columns = columns

    @property
    def qualified(self) -> str:
        return f"{quote(self.schema)}.{quote(self.name)}"

    def column(self, name: str) -> str:
        try:
            return quote(self.columns[name][0])
        except KeyError:
            raise ValueError(f"{self.qualified} has no column {name!r} (nor {name.upper()!r})") from None

    def type_of(self, name: str) -> str:
        return self.columns[name][1]


class SnowflakeSource:
    """The Snowflake source over one connector connection (opened by the Airflow SnowflakeHook with the
    session parameter ``TIMEZONE = 'UTC'``, see :func:`usage_billing.sources.snowflake.open_snowflake_source`)."""

    def __init__(self, connection: Any, schema: str, kind: SourceKind | None = None):
        self.connection = connection
        self.schema = check_identifier(schema, "source schema")
        self.kind = kind
        self.cost = QueryCost()
        self._tables: dict[str, EventTable | None] = {}

    # -- layout ---------------------------------------------------------------------------------

    def event_table(self, table: str) -> EventTable | None:
        """The table Segment named ``table`` in the source schema, whatever case Snowflake stores it in."""
        check_identifier(table, "event table")
        if table not in self._tables:
            with self.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns"
                    " WHERE UPPER(table_schema) = UPPER(%(schema)s) AND UPPER(table_name) = UPPER(%(table)s)"
                    " ORDER BY ordinal_position", {"schema": self.schema, "table": table})
                rows = cursor.fetchall()
            self._tables[table] = _event_table(rows, self.schema, table)
        return self._tables[table]

    def table_columns(self, table: str) -> list[str] | None:
        found = self.event_table(table)
        return None if found is None else list(found.columns)

    # -- reads ----------------------------------------------------------------------------------

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        table = self._require(request.partition.table)
        wanted = [name for name in dict.fromkeys(request.columns) if name in table.columns]
        selected = ", ".join(f"{table.column(name)} AS {quote(name)}" for name in wanted)
        id_, loaded_at = table.column("id"), table.column(request.loaded_at_column)
        for scope, params in self._scopes(table, request):
            sql = (f"SELECT {selected}, COUNT(*) OVER (PARTITION BY {id_}) AS {quote(COPIES)}"
                   f" FROM {table.qualified} WHERE {scope}"
                   f" QUALIFY ROW_NUMBER() OVER (PARTITION BY {id_} ORDER BY {loaded_at} DESC) = 1")
            yield from self._fetch(sql, params, request.partition.table, request.chunk_size)

    def _fetch(self, sql: str, params: dict, event_table: str, chunk_size: int) -> Iterator[pd.DataFrame]:
        cursor = self.connection.cursor()
        rows = copies = 0
        try:
            cursor.execute(sql, params)
            for chunk in arrow.rechunk(cursor.fetch_arrow_batches(), chunk_size):
                frame = arrow.to_frame(chunk, {}, event_table)
                rows += len(frame)
                copies += int(frame[COPIES].sum())
                yield frame
        finally:
            # Rows the window matched (duplicates included): what the query read after pruning.
            self.cost.add(rows_scanned=copies, query_id=cursor.sfqid)
            log.debug("snowflake query %s: %d rows, %d copies", cursor.sfqid, rows, copies)
            cursor.close()

    def count_rows(self, table: str, window: Window, loaded_at_column: str) -> int:
        found = self._require(table)
        scope, params = _window_scope(found, window, loaded_at_column)
        return self._scalar(f"SELECT COUNT(*) FROM {found.qualified} WHERE {scope}", params)

    def count_events(self, request: ReadRequest) -> int:
        table = self._require(request.partition.table)
        return sum(self._scalar(f"SELECT COUNT(DISTINCT {table.column('id')}) FROM {table.qualified} WHERE {scope}",
                                params) for scope, params in self._scopes(table, request))

    def shares_database_with(self, engine: object) -> bool:
        return False  # the ledger never lives in Snowflake (no enforced keys, no advisory locks)

    def close(self) -> None:
        self.connection.close()

    # -- helpers --------------------------------------------------------------------------------

    def _require(self, table: str) -> EventTable:
        found = self.event_table(table)
        if found is None:
            raise ValueError(f"source: no table {table!r} in Snowflake schema {self.schema!r} "
                             f"(looked for {self.schema.upper()}.{table.upper()} in any case)")
        return found

    def _scopes(self, table: EventTable, request: ReadRequest) -> Iterator[tuple[str, dict]]:
        """The WHERE clauses of a request: its window, or its ids in lists of :data:`IDS_PER_QUERY`
        (loaded since ``loaded_since`` when given)."""
        partition = request.partition
        bucket, bucket_params = "", {}
        if partition.buckets > 1:
            # HASH is Snowflake's stable 64-bit hash: the buckets partition the ids exactly.
            bucket = f" AND ABS(MOD(HASH({table.column('id')}), %(buckets)s)) = %(bucket)s"
            bucket_params = {"buckets": partition.buckets, "bucket": partition.bucket}
        if request.ids is None:
            assert request.window is not None, "a read names a window or ids"
            scope, params = _window_scope(table, request.window, request.loaded_at_column)
            yield scope + bucket, params | bucket_params
            return
        since, since_params = "", {}
        if request.loaded_since is not None:
            # Chosen ids loaded since a known time: micro-partitions loaded before it are skipped.
            scope, since_params = _loaded_scope(table, request.loaded_at_column, request.loaded_since)
            since = f" AND {scope}"
        for scope, params in ids_in(table.column("id"), request.ids, IDS_PER_QUERY):
            yield scope + since + bucket, params | since_params | bucket_params

    def _scalar(self, sql: str, params: dict) -> int:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            (value,) = cursor.fetchone()
            self.cost.add(query_id=cursor.sfqid)
        return int(value)


def _window_scope(table: EventTable, window: Window, loaded_at_column: str) -> tuple[str, dict]:
    return _loaded_scope(table, loaded_at_column, window.scan_start, window.end)


def _loaded_scope(table: EventTable, loaded_at_column: str, since: datetime, until: datetime | None = None
                  ) -> tuple[str, dict]:
    """Rows loaded in ``[since, until)`` (``until`` None: no upper bound), bounds cast to the column's type."""
    column = table.column(loaded_at_column)
    sql_type = table.type_of(loaded_at_column)
    if sql_type not in _TIMESTAMP_TYPES:
        raise ValueError(f"source.loaded_at_column: {table.qualified}.{column} is {sql_type}, not a timestamp")
    scope, params = f"{column} >= %(scan_start)s::{sql_type}", {"scan_start": _bound(since)}
    if until is not None:
        scope += f" AND {column} < %(end)s::{sql_type}"
        params["end"] = _bound(until)
    return scope, params


def _event_table(rows: Sequence[tuple], schema: str, table: str) -> EventTable | None:
    """Pick the table among case variants (Segment's upper-case one first) and index its columns."""
    if not rows:
        return None
    variants = {(r[0], r[1]) for r in rows}
    preferred = (schema.upper(), table.upper())
    chosen = preferred if preferred in variants else sorted(variants)[0]
    if len(variants) > 1:
        log.warning("Snowflake holds %s in several cases (%s); reading %s.%s", table, sorted(variants), *chosen)
    columns: dict[str, tuple[str, str]] = {}
    for row_schema, row_table, column, data_type in rows:
        if (row_schema, row_table) != chosen:
            continue
        key = column.lower()
        # Both "timestamp" and TIMESTAMP in one table: Segment's own (unquoted, upper) wins.
        if key not in columns or column == column.upper():
            columns[key] = (column, data_type.upper())
    return EventTable(chosen[0], chosen[1], columns)
