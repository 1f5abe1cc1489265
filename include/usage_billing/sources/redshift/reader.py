"""Segment's track tables on Redshift, read through a server-side cursor.

Segment's Redshift layout (https://segment.com/docs/connections/storage/catalog/redshift/): a schema
per Segment source, a table per event, lower-case columns (a ``_`` prefix on names Redshift reserves
or that start with a digit), ``TIMESTAMP`` without time zone holding UTC, ``received_at`` as sort key
and ``id`` as distribution key; ``uuid_ts`` says when Segment loaded the row.

Why a cursor and not ``UNLOAD``: a billing window is an hour or a day of one event table, tens of
thousands to a few million rows, and the pipeline can split it further by id hash bucket (each bucket
its own cursor). A cursor's result is materialised on the leader node (AWS advises against cursors for
large results), but at that size it is the cheaper path: ``UNLOAD ... FORMAT PARQUET`` needs an S3
bucket, an IAM role the cluster can assume, a round trip through S3 and its clean-up, and cannot be
tested without AWS. Reading a window far larger than the leader node should hold is a planning error
this source reports (:data:`LARGE_WINDOW_ROWS`) rather than a case for a second read path.

The SQL is the subset PostgreSQL and Redshift share (a ``ROW_NUMBER()`` subquery rather than
``QUALIFY``), plus Redshift's ``FNV_HASH`` for id buckets; every statement sent is kept in
:attr:`RedshiftSource.statements` so the tests can parse each one with a Redshift grammar.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from usage_billing.frames import pd
from usage_billing.naming import check_identifier
from usage_billing.sources.base import QueryCost, ReadRequest, SourceKind
from usage_billing.sources.layout import COPIES, TABLE, Window
from usage_billing.sources.params import ids_in

log = logging.getLogger(__name__)

IDS_PER_QUERY = 1_000
# Above this many rows in one read, the planner should split the window (hash buckets, shorter windows).
LARGE_WINDOW_ROWS = 20_000_000


def quote(name: str) -> str:
    return '"' + check_identifier(name, "identifier") + '"'


def _converter(data_type: str) -> Callable[[list], Any]:
    """Python values of one column to the contract's pandas dtype, by the column's SQL type."""
    if data_type.startswith("timestamp"):
        return lambda values: pd.to_datetime(pd.Series(values, dtype="object"), utc=True).astype("datetime64[us, UTC]")
    if data_type in ("smallint", "integer", "bigint"):
        return lambda values: pd.array(values, dtype="Int64")
    if data_type in ("real", "double precision"):
        return lambda values: pd.array([None if v is None else float(v) for v in values], dtype="Float64")
    if data_type == "boolean":
        return lambda values: pd.array(values, dtype="boolean")
    if data_type in ("character varying", "character", "text"):
        return lambda values: pd.array(values, dtype="string")
    return lambda values: pd.Series(values, dtype="object")  # NUMERIC as Decimal, SUPER, ...


class RedshiftSource:
    """The Redshift source over one DB-API connection (psycopg2, PostgreSQL wire protocol)."""

    def __init__(self, connection: Any, schema: str, kind: SourceKind | None = None):
        self.connection = connection
        self.schema = check_identifier(schema, "source schema")
        self.kind = kind
        self.cost = QueryCost()
        self.statements: list[str] = []
        self._tables: dict[str, dict[str, str] | None] = {}

    def _execute(self, cursor: Any, sql: str, params: dict | None = None) -> None:
        statement = cursor.mogrify(sql, params)
        self.statements.append(statement.decode() if isinstance(statement, bytes) else statement)
        cursor.execute(sql, params)

    # -- layout ---------------------------------------------------------------------------------

    def _columns(self, table: str) -> dict[str, str] | None:
        check_identifier(table, "event table")
        if table not in self._tables:
            with self.connection.cursor() as cursor:
                self._execute(cursor, "SELECT column_name, data_type FROM information_schema.columns"
                                      " WHERE table_schema = %(schema)s AND table_name = %(table)s"
                                      " ORDER BY ordinal_position", {"schema": self.schema, "table": table})
                rows = cursor.fetchall()
            self.connection.rollback()  # end the read-only transaction: no idle locks on the catalog
            self._tables[table] = {name: data_type for name, data_type in rows} or None
        return self._tables[table]

    def table_columns(self, table: str) -> list[str] | None:
        columns = self._columns(table)
        return None if columns is None else list(columns)

    def _require(self, table: str) -> dict[str, str]:
        columns = self._columns(table)
        if columns is None:
            raise ValueError(f"source: no table {self.schema}.{table} in Redshift")
        return columns

    # -- reads ----------------------------------------------------------------------------------

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        table = request.partition.table
        columns = self._require(table)
        wanted = [name for name in dict.fromkeys(request.columns) if name in columns]
        listed = ", ".join(quote(name) for name in wanted)
        for scope, params in self._scopes(columns, request):
            sql = (f"SELECT {listed}, {quote(COPIES)} FROM ("
                   f"SELECT {listed}, COUNT(*) OVER (PARTITION BY \"id\") AS {quote(COPIES)},"
                   f" ROW_NUMBER() OVER (PARTITION BY \"id\" ORDER BY {quote(request.loaded_at_column)} DESC)"
                   f" AS \"_rank\" FROM {quote(self.schema)}.{quote(table)} WHERE {scope}) AS ranked"
                   f" WHERE \"_rank\" = 1")
            yield from self._fetch(sql, params, wanted, columns, table, request.chunk_size)

    def _fetch(self, sql: str, params: dict, wanted: list[str], columns: dict[str, str], table: str,
               chunk_size: int) -> Iterator[pd.DataFrame]:
        converters = [_converter(columns[name]) for name in wanted] + [_converter("bigint")]
        names = [*wanted, COPIES]
        # A server-side cursor in Redshift's documented syntax (DECLARE / FETCH FORWARD / CLOSE, inside the
        # transaction psycopg2 opens): only chunk_size rows are in client memory at a time. psycopg2's own
        # named cursors add "WITHOUT HOLD", which Redshift's DECLARE does not document.
        name = f"usage_billing_{uuid.uuid4().hex[:12]}"
        copies = 0
        try:
            with self.connection.cursor() as cursor:
                self._execute(cursor, f"DECLARE {name} CURSOR FOR {sql}", params)
                while True:
                    self._execute(cursor, f"FETCH FORWARD {int(chunk_size)} FROM {name}")
                    rows = cursor.fetchall()
                    if not rows:
                        break
                    values = list(zip(*rows, strict=True))
                    frame = pd.DataFrame({column: convert(list(data)) for column, convert, data
                                          in zip(names, converters, values, strict=True)})
                    frame[TABLE] = table
                    copies += int(frame[COPIES].sum())
                    yield frame
                self._execute(cursor, f"CLOSE {name}")
        finally:
            self.connection.rollback()  # ends the transaction, and with it the cursor if a reader stopped early
            self.cost.add(rows_scanned=copies)
            if copies > LARGE_WINDOW_ROWS:
                log.warning("Redshift read of %s matched %d rows: the leader node materialised them all; "
                            "split the window (shorter windows or more id buckets)", table, copies)

    def count_rows(self, table: str, window: Window, loaded_at_column: str) -> int:
        columns = self._require(table)
        scope, params = _window_scope(columns, window, loaded_at_column)
        return self._scalar(f"SELECT COUNT(*) FROM {quote(self.schema)}.{quote(table)} WHERE {scope}", params)

    def count_events(self, request: ReadRequest) -> int:
        table = request.partition.table
        columns = self._require(table)
        return sum(self._scalar(f"SELECT COUNT(DISTINCT \"id\") FROM {quote(self.schema)}.{quote(table)}"
                                f" WHERE {scope}", params) for scope, params in self._scopes(columns, request))

    def shares_database_with(self, engine: object) -> bool:
        return False  # the ledger never lives in Redshift (no enforced keys, no advisory locks)

    def close(self) -> None:
        self.connection.close()

    # -- helpers --------------------------------------------------------------------------------

    def _scalar(self, sql: str, params: dict) -> int:
        with self.connection.cursor() as cursor:
            self._execute(cursor, sql, params)
            (value,) = cursor.fetchone()
        self.connection.rollback()
        self.cost.add()
        return int(value)

    def _scopes(self, columns: dict[str, str], request: ReadRequest) -> Iterator[tuple[str, dict]]:
        partition = request.partition
        bucket, bucket_params = "", {}
        if partition.buckets > 1:
            # FNV_HASH is Redshift's stable 64-bit hash; MOD before ABS, as ABS of the smallest BIGINT overflows.
            bucket = " AND ABS(MOD(FNV_HASH(\"id\"), %(buckets)s)) = %(bucket)s"
            bucket_params = {"buckets": partition.buckets, "bucket": partition.bucket}
        if request.ids is None:
            assert request.window is not None, "a read names a window or ids"
            scope, params = _window_scope(columns, request.window, request.loaded_at_column)
            yield scope + bucket, params | bucket_params
            return
        for scope, params in ids_in('"id"', request.ids, IDS_PER_QUERY):
            yield scope + bucket, params | bucket_params


def _window_scope(columns: dict[str, str], window: Window, loaded_at_column: str) -> tuple[str, dict]:
    data_type = columns.get(loaded_at_column, "")
    if not data_type.startswith("timestamp"):
        raise ValueError(f"source.loaded_at_column: {loaded_at_column!r} is {data_type or 'missing'}, "
                         f"not a timestamp")

    def bound(value: datetime) -> datetime:
        value = value.astimezone(UTC)
        # TIMESTAMP (Segment's type) holds UTC wall time: compare with naive UTC, never a session zone.
        return value if "with time zone" in data_type else value.replace(tzinfo=None)

    column = quote(loaded_at_column)
    return (f"{column} >= %(scan_start)s AND {column} < %(end)s",
            {"scan_start": bound(window.scan_start), "end": bound(window.end)})
