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

Each query's id (``PG_LAST_QUERY_ID()``, asked only when ``version()`` names Redshift) and the rows
its window matched go to :attr:`RedshiftSource.cost` for the task summary. Unverified against a live
Redshift: the tests run on PostgreSQL, which has neither.
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
        self._redshift: bool | None = None

    def _execute(self, cursor: Any, sql: str, params: dict | None = None) -> None:
        statement = cursor.mogrify(sql, params)
        self.statements.append(statement.decode() if isinstance(statement, bytes) else statement)
        cursor.execute(sql, params)

    def is_redshift(self) -> bool:
        """Whether the server is Redshift (its ``version()`` says so), asked once: the tests run this
        source on PostgreSQL, which has no query ids to report."""
        if self._redshift is None:
            with self.connection.cursor() as cursor:
                self._execute(cursor, "SELECT version()")
                (version,) = cursor.fetchone()
            self.connection.rollback()
            self._redshift = "redshift" in str(version).lower()
        return self._redshift

    def _query_id(self, cursor: Any) -> str | None:
        """The id Redshift gave the last query that ran on the compute nodes (``PG_LAST_QUERY_ID()``;
        -1 when none did), for the task summary: ``SYS_QUERY_HISTORY`` / ``STL_QUERY`` tell its cost.
        None on PostgreSQL, which has no such function."""
        if not self._redshift:
            return None
        self._execute(cursor, "SELECT pg_last_query_id()")
        (query_id,) = cursor.fetchone()
        return None if query_id is None or int(query_id) < 0 else str(query_id)

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
        self.is_redshift()  # asked before the cursor's transaction, which the answer's rollback would end
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
        copies, query_id, asked = 0, None, False
        try:
            with self.connection.cursor() as cursor:
                self._execute(cursor, f"DECLARE {name} CURSOR FOR {sql}", params)
                while True:
                    self._execute(cursor, f"FETCH FORWARD {int(chunk_size)} FROM {name}")
                    rows = cursor.fetchall()
                    if not asked:  # the first FETCH returns once the cursor's query has run
                        query_id, asked = self._query_id(cursor), True
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
            self.cost.add(rows_scanned=copies, query_id=query_id)
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
        self.is_redshift()
        with self.connection.cursor() as cursor:
            self._execute(cursor, sql, params)
            (value,) = cursor.fetchone()
            query_id = self._query_id(cursor)
        self.connection.rollback()
        self.cost.add(query_id=query_id)
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
        since, since_params = "", {}
        if request.loaded_since is not None:
            # Chosen ids loaded since a known time: blocks loaded before it are skipped by zone maps.
            scope, since_params = _loaded_scope(columns, request.loaded_at_column, request.loaded_since)
            since = f" AND {scope}"
        for scope, params in ids_in('"id"', request.ids, IDS_PER_QUERY):
            yield scope + since + bucket, params | since_params | bucket_params


def _window_scope(columns: dict[str, str], window: Window, loaded_at_column: str) -> tuple[str, dict]:
    return _loaded_scope(columns, loaded_at_column, window.scan_start, window.end)


def _loaded_scope(columns: dict[str, str], loaded_at_column: str, since: datetime, until: datetime | None = None
                  ) -> tuple[str, dict]:
    """Rows loaded in ``[since, until)`` (``until`` None: no upper bound)."""
    data_type = columns.get(loaded_at_column, "")
    if not data_type.startswith("timestamp"):
        raise ValueError(f"source.loaded_at_column: {loaded_at_column!r} is {data_type or 'missing'}, "
                         f"not a timestamp")

    def bound(value: datetime) -> datetime:
        value = value.astimezone(UTC)
        # TIMESTAMP (Segment's type) holds UTC wall time: compare with naive UTC, never a session zone.
        return value if "with time zone" in data_type else value.replace(tzinfo=None)

    column = quote(loaded_at_column)
    scope, params = f"{column} >= %(scan_start)s", {"scan_start": bound(since)}
    if until is not None:
        scope += f" AND {column} < %(end)s"
        params["end"] = bound(until)
    return scope, params
