"""The SQL source: Segment's track tables on PostgreSQL (and Redshift-compatible dialects) or SQLite.

Reads go through SQLAlchemy Core with identifiers from the configuration validated and quoted, and
stream in bounded chunks so memory does not grow with the window: on PostgreSQL by ``COPY`` into
pandas' C CSV parser, elsewhere through a server-side cursor.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from usage_billing.frames import pd
from usage_billing.sources.base import ReadRequest
from usage_billing.sources.layout import COPIES, TABLE, Window

log = logging.getLogger(__name__)

def table_columns(conn: Connection, schema: str, table: str) -> list[str] | None:
    """The columns of an event table, or None when the table does not exist."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(table, schema=schema):
        return None
    return [column["name"] for column in inspector.get_columns(table, schema=schema)]


def _bucket_expression(conn: Connection, column: sa.ColumnElement, buckets: int) -> sa.ColumnElement:
    """A stable hash bucket of a text column, computed in the database."""
    if conn.dialect.name == "postgresql":
        return sa.func.abs(sa.func.hashtext(column) % buckets)
    # SQLite has no hash function; register a deterministic one on this connection.
    import zlib

    raw = conn.connection.dbapi_connection
    raw.create_function("usage_billing_bucket", 2, lambda value, n: zlib.crc32((value or "").encode()) % n,
                        deterministic=True)
    return sa.func.usage_billing_bucket(column, buckets)


def read_events(conn: Connection, schema: str, request: ReadRequest, *, copy: bool = True) -> Iterator[pd.DataFrame]:
    """Yield the window's rows of one event table in chunks, one row per ``id``.

    Duplicate rows (same ``id``, loaded twice) are collapsed to the most recently loaded copy;
    the ``_copies`` column says how many copies the window held, so duplicates can be counted.
    Timestamp columns come back as UTC-aware pandas timestamps on every dialect. With ``ids``
    (a replay, held or queued events) those rows are read, loaded since ``loaded_since`` when given.
    ``unknown_to_ledger`` adds the ledger filter (leave out what was delivered) to the query. On PostgreSQL, with
    ``copy`` and columns of plain types, rows are streamed by ``COPY`` (:func:`_read_by_copy`).
    """
    partition = request.partition
    table = sa.Table(partition.table, sa.MetaData(), schema=schema, autoload_with=conn)
    loaded_at = table.c[request.loaded_at_column]
    wanted = [table.c[name] for name in dict.fromkeys(request.columns) if name in table.c]
    ranked = (
        sa.select(
            *wanted,
            sa.func.count().over(partition_by=table.c.id).label(COPIES),
            sa.func.row_number().over(partition_by=table.c.id, order_by=loaded_at.desc()).label("_rank"),
        )
    )
    ranked = ranked.where(*_scope(conn, table, request))
    if request.unknown_to_ledger is not None:
        ranked = ranked.where(request.unknown_to_ledger(table))
    ranked = ranked.subquery("ranked")
    statement = sa.select(*[ranked.c[c.name] for c in wanted], ranked.c[COPIES]).where(ranked.c["_rank"] == 1)

    names = [c.name for c in wanted] + [COPIES]
    if copy and conn.dialect.name == "postgresql" and all(_copy_type(c.type) for c in wanted):
        chunks = _read_by_copy(conn, ranked, wanted, request.chunk_size)
    else:
        chunks = _read_by_cursor(conn, statement, wanted, names, request.chunk_size)
    for chunk in chunks:
        chunk[TABLE] = partition.table
        yield chunk


def _read_by_cursor(conn: Connection, statement: sa.Select, wanted: list[sa.Column], names: list[str],
                    chunk_size: int) -> Iterator[pd.DataFrame]:
    """Rows as Python values from a server-side cursor, each column converted by its SQL type."""
    converters = [_converter(c.type) for c in wanted] + [_converter(sa.Integer())]
    result = conn.execution_options(stream_results=True, max_row_buffer=chunk_size).execute(statement)
    while rows := result.fetchmany(chunk_size):
        values = list(zip(*rows, strict=True))
        yield pd.DataFrame({name: _convert(convert, list(column)) for name, convert, column
                            in zip(names, converters, values, strict=True)})


def _copy_type(sql_type: sa.types.TypeEngine) -> str | None:
    """The pandas dtype a column is parsed into from PostgreSQL's CSV, or None when the column
    needs the cursor path (NUMERIC kept as Decimal, JSON, arrays, anything else)."""
    if isinstance(sql_type, sa.DateTime | sa.Date):
        return "timestamp"
    if isinstance(sql_type, sa.Boolean):
        return "boolean"
    if isinstance(sql_type, sa.Integer):
        return "Int64"
    if isinstance(sql_type, sa.Float):
        return "float64"
    if isinstance(sql_type, sa.String | sa.Text | sa.Enum):
        return "string"
    return None


def _read_by_copy(conn: Connection, ranked: sa.Subquery, wanted: list[sa.Column],
                  chunk_size: int) -> Iterator[pd.DataFrame]:
    """The same rows as :func:`_read_by_cursor`, streamed as CSV by ``COPY ... TO STDOUT`` and
    parsed by pandas' C parser: about three times less Python work per row than a cursor, which
    builds a Python object per value.

    NULL is written as a random token that no value can be expected to equal, so NULL and the
    empty string stay apart. Timestamps travel as UTC text with microseconds. A thread runs the
    COPY into a pipe and pandas reads the other end in ``chunk_size`` rows, so memory stays flat.
    """
    null = f"usage_billing_null_{uuid.uuid4().hex}"
    columns, dtypes = [], {}
    for column in wanted:
        value = ranked.c[column.name]
        kind = _copy_type(column.type)
        if kind == "timestamp":
            if getattr(column.type, "timezone", False):
                value = sa.func.timezone("UTC", value)
            value = sa.func.to_char(value, 'YYYY-MM-DD"T"HH24:MI:SS.US')
        columns.append(value.label(column.name))
        dtypes[column.name] = "string" if kind == "timestamp" else kind
    columns.append(ranked.c[COPIES])
    dtypes[COPIES] = "Int64"
    query = sa.select(*columns).where(ranked.c["_rank"] == 1).compile(
        dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    dbapi = conn.connection.dbapi_connection
    with dbapi.cursor() as cursor:
        sql = cursor.mogrify(str(query), query.params).decode()
    copy = f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, NULL '{null}')"

    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_end, "wb") as sink, dbapi.cursor() as cursor:
                cursor.copy_expert(copy, sink, size=1 << 16)
        except BaseException as error:  # raised in the reading thread below
            failure.append(error)

    writer = threading.Thread(target=produce, name="usage-billing-copy", daemon=True)
    writer.start()
    finished = False
    try:
        with os.fdopen(read_end, "rb") as source:
            frames = pd.read_csv(source, header=None, names=list(dtypes), dtype=dtypes, chunksize=chunk_size,
                                 na_values={name: [null, "NaN"] if kind == "float64" else [null]
                                            for name, kind in dtypes.items()},
                                 keep_default_na=False, true_values=["t"], false_values=["f"])
            for frame in frames:
                for column in wanted:
                    if _copy_type(column.type) == "timestamp":
                        frame[column.name] = pd.to_datetime(frame[column.name], format="%Y-%m-%dT%H:%M:%S.%f",
                                                            utc=True, errors="coerce")
                    elif _copy_type(column.type) == "float64":
                        frame[column.name] = frame[column.name].astype("Float64")
                yield frame
            finished = True
    finally:
        if not finished and writer.is_alive():
            dbapi.cancel()  # the reader stopped early: stop the COPY, the pipe is closed
        writer.join()
        if not finished:
            conn.invalidate()  # a COPY cut short leaves the connection unusable
    if failure:
        raise failure[0]


def _convert(convert, values: list) -> object:
    # A value that does not fit the declared type (SQLite does not enforce types) keeps the column
    # as objects, so the mapping rejects that row instead of the read failing for the whole chunk.
    try:
        return convert(values)
    except (TypeError, ValueError, OverflowError):
        return pd.Series(values, dtype="object")


def _converter(sql_type: sa.types.TypeEngine):
    """How a column's Python values become a pandas column without losing meaning.

    Integers become nullable ``Int64`` (a NULL must not turn 3 into 3.0), floats ``Float64``,
    booleans ``boolean``, text ``string``, timestamps UTC-aware. Everything else (NUMERIC as Decimal,
    JSON as dict or list) stays as Python objects, so the mapping can judge each value: pandas'
    own dtype inference would silently round big numbers or turn a JSON object into its text.
    """
    if isinstance(sql_type, sa.DateTime | sa.Date):
        return lambda values: pd.to_datetime(pd.Series(values, dtype="object"), utc=True, errors="coerce")
    if isinstance(sql_type, sa.Boolean):
        return lambda values: pd.array(values, dtype="boolean")
    if isinstance(sql_type, sa.Integer):
        return lambda values: pd.array(values, dtype="Int64")
    if isinstance(sql_type, sa.Float):
        return lambda values: pd.array([None if v is None else float(v) for v in values], dtype="Float64")
    if isinstance(sql_type, sa.String | sa.Text | sa.Enum):
        return lambda values: pd.array(values, dtype="string")
    return lambda values: pd.Series(values, dtype="object")


def _scope(conn: Connection, table: sa.Table, request: ReadRequest) -> list[sa.ColumnElement[bool]]:
    """The rows of a partition: its window on the loaded-at column (or the given ids, loaded since
    ``loaded_since`` when known), its bucket."""
    partition, window = request.partition, request.window
    loaded_at = table.c[request.loaded_at_column]
    if request.ids is not None:
        conditions = [table.c.id.in_(list(request.ids))]
        if request.loaded_since is not None:
            conditions.append(loaded_at >= request.loaded_since.astimezone(UTC))
    else:
        assert window is not None
        conditions = [loaded_at >= window.scan_start, loaded_at < window.end]
    if partition.buckets > 1:
        conditions.append(_bucket_expression(conn, table.c.id, partition.buckets) == partition.bucket)
    return conditions


def count_events(conn: Connection, schema: str, request: ReadRequest) -> int:
    """Distinct events (``id``) of a partition's window."""
    table = sa.Table(request.partition.table, sa.MetaData(), schema=schema, autoload_with=conn)
    # GROUP BY lets PostgreSQL hash the ids; count(DISTINCT) always sorts them.
    events = sa.select(table.c.id).where(*_scope(conn, table, request))
    return int(conn.execute(sa.select(sa.func.count()).select_from(events.group_by(table.c.id).subquery()))
               .scalar_one())


def count_window(conn: Connection, schema: str, table: str, window: Window, loaded_at_column: str) -> int:
    """Rows (duplicates included) of one event table in the window: cheap planning information."""
    source = sa.Table(table, sa.MetaData(), schema=schema, autoload_with=conn)
    loaded_at = source.c[loaded_at_column]
    statement = sa.select(sa.func.count()).where(loaded_at >= window.scan_start, loaded_at < window.end)
    return int(conn.execute(statement).scalar_one())
