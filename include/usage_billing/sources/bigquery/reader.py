"""Segment's track tables on BigQuery, read through the Storage Read API.

Segment's BigQuery layout (https://segment.com/docs/connections/storage/catalog/bigquery/): a dataset
per Segment source, a table per event (``project.<source>.<event>``), lower-case columns, TIMESTAMP
values in UTC, a ``loaded_at`` column (when Segment's processor staged the row), tables partitioned by
ingestion time (``_PARTITIONTIME``, by day) that **keep duplicates** (only the ``<table>_view`` views
de-duplicate, over 60 days, and scan all 60 days every time).

So the source reads the tables, not the views, with one query per read that

* prunes partitions: a row is ingested after it was staged or received, so no row of the window lives
  in a partition older than the window's first day (``_PARTITIONTIME >= TIMESTAMP_TRUNC(scan_start)``);
* filters the window on the loaded-at column and keeps the most recently loaded copy of each id
  (``QUALIFY ROW_NUMBER()``), counting copies (``COUNT(*) OVER``), so duplicates never leave BigQuery;
* reads chosen ids (a replay, held or queued events) from the earliest load the ledger recorded for
  them (``ReadRequest.loaded_since``), pruned the same way;
* carries ``maximum_bytes_billed`` (``source.maximum_bytes_billed``, 100 GiB unless set): BigQuery refuses
  a query that would bill more, instead of billing it, and the task fails naming the setting;
* writes its result to a table in the results dataset (``CREATE TABLE ... AS``, expiring after a day)
  that the Storage Read API then streams as Arrow: the REST ``tabledata.list`` path builds JSON rows
  and is tens of times slower. The table is dropped after the read.

Each query's bytes processed and job id go to :attr:`BigQuerySource.cost` for the task summary.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from usage_billing.frames import pd
from usage_billing.naming import check_identifier
from usage_billing.sources import arrow
from usage_billing.sources.base import QueryCost, ReadRequest, SourceKind
from usage_billing.sources.layout import COPIES, Window

log = logging.getLogger(__name__)

# Ids per query when replaying a list of ids (one array parameter each).
IDS_PER_QUERY = 10_000
# A results table outlives a crashed task by at most this long.
RESULT_EXPIRY_HOURS = 24


def quote(name: str) -> str:
    return f"`{name}`"


class BytesBilledExceeded(RuntimeError):
    """BigQuery refused a query that would bill more than ``source.maximum_bytes_billed``."""


def _over_the_cap(error: Exception) -> bool:
    """Whether BigQuery refused a job for the byte cap (error reason ``bytesBilledLimitExceeded``)."""
    reasons = {str(e.get("reason")) for e in getattr(error, "errors", None) or [] if isinstance(e, dict)}
    return "bytesBilledLimitExceeded" in reasons or "exceeded limit for bytes billed" in str(error).lower()


class BigQuerySource:
    """The BigQuery source over a REST client (queries) and a Storage Read client (results)."""

    def __init__(self, client: Any, read_client: Any, dataset: str, results_dataset: str,
                 maximum_bytes_billed: int, kind: SourceKind | None = None):
        if not isinstance(maximum_bytes_billed, int) or maximum_bytes_billed < 1:
            raise ValueError(f"source.maximum_bytes_billed: every BigQuery query carries a byte cap; "
                             f"got {maximum_bytes_billed!r}, expected a positive number of bytes")
        self.client = client
        self.read_client = read_client
        self.schema = check_identifier(dataset, "source dataset")
        self.results_dataset = check_identifier(results_dataset, "results dataset")
        self.maximum_bytes_billed = maximum_bytes_billed
        self.kind = kind
        self.cost = QueryCost()
        self._tables: dict[str, Any] = {}
        self._results_ready = False

    # -- layout ---------------------------------------------------------------------------------

    def _table(self, table: str):
        from google.api_core.exceptions import NotFound

        check_identifier(table, "event table")
        if table not in self._tables:
            try:
                self._tables[table] = self.client.get_table(f"{self.client.project}.{self.schema}.{table}")
            except NotFound:
                self._tables[table] = None
        return self._tables[table]

    def table_columns(self, table: str) -> list[str] | None:
        found = self._table(table)
        return None if found is None else [field.name.lower() for field in found.schema]

    def _require(self, table: str):
        found = self._table(table)
        if found is None:
            raise ValueError(f"source: no table {self.client.project}.{self.schema}.{table} in BigQuery")
        return found

    # -- reads ----------------------------------------------------------------------------------

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        table = self._require(request.partition.table)
        present = {field.name.lower(): field.name for field in table.schema}
        wanted = [name for name in dict.fromkeys(request.columns) if name in present]
        selected = ", ".join(f"{quote(present[name])} AS {quote(name)}" for name in wanted)
        loaded_at = quote(present[request.loaded_at_column])
        for scope, params in self._scopes(table, request):
            result = f"{self.client.project}.{self.results_dataset}.usage_billing_{uuid.uuid4().hex}"
            sql = (f"CREATE TABLE {quote(result)}"
                   f" OPTIONS (expiration_timestamp = TIMESTAMP_ADD(CURRENT_TIMESTAMP(),"
                   f" INTERVAL {RESULT_EXPIRY_HOURS} HOUR)) AS"
                   f" SELECT {selected}, COUNT(*) OVER (PARTITION BY `id`) AS {quote(COPIES)}"
                   f" FROM {quote(table.full_table_id.replace(':', '.'))} WHERE {scope}"
                   f" QUALIFY ROW_NUMBER() OVER (PARTITION BY `id` ORDER BY {loaded_at} DESC) = 1")
            self._ensure_results_dataset()
            self._query(sql, params)
            yield from self._stream(result, request.partition.table, request.chunk_size)

    def _stream(self, result: str, event_table: str, chunk_size: int) -> Iterator[pd.DataFrame]:
        """The results table through the Storage Read API, in chunks; dropped afterwards."""
        try:
            rows = self.client.list_rows(result)
            batches = rows.to_arrow_iterable(bqstorage_client=self.read_client, max_queue_size=2)
            for chunk in arrow.rechunk(batches, chunk_size):
                yield arrow.to_frame(chunk, {}, event_table)
        finally:
            self.client.delete_table(result, not_found_ok=True)

    def count_rows(self, table: str, window: Window, loaded_at_column: str) -> int:
        found = self._require(table)
        scope, params = _window_scope(found, window, loaded_at_column)
        return self._scalar(f"SELECT COUNT(*) FROM {quote(found.full_table_id.replace(':', '.'))} WHERE {scope}",
                            params)

    def count_events(self, request: ReadRequest) -> int:
        table = self._require(request.partition.table)
        name = quote(table.full_table_id.replace(":", "."))
        return sum(self._scalar(f"SELECT COUNT(DISTINCT `id`) FROM {name} WHERE {scope}", params)
                   for scope, params in self._scopes(table, request))

    def shares_database_with(self, engine: object) -> bool:
        return False  # the ledger never lives in BigQuery (no enforced keys, DML throttled)

    def close(self) -> None:
        self.client.close()
        transport = getattr(self.read_client, "transport", None)
        if transport is not None:
            transport.close()

    # -- helpers --------------------------------------------------------------------------------

    def _ensure_results_dataset(self) -> None:
        if self._results_ready:
            return
        from google.cloud import bigquery

        dataset = bigquery.Dataset(f"{self.client.project}.{self.results_dataset}")
        dataset.default_table_expiration_ms = RESULT_EXPIRY_HOURS * 3600 * 1000
        self.client.create_dataset(dataset, exists_ok=True)
        self._results_ready = True

    def _query(self, sql: str, params: list) -> Any:
        """Run one query with the byte cap, record what BigQuery reported, return its result."""
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(query_parameters=params, maximum_bytes_billed=self.maximum_bytes_billed)
        job = self.client.query(sql, job_config=config)
        try:
            rows = job.result()
        except Exception as error:
            if _over_the_cap(error):
                raise BytesBilledExceeded(
                    f"BigQuery refused job {job.job_id}: it would bill more than source.maximum_bytes_billed = "
                    f"{self.maximum_bytes_billed} bytes ({self.maximum_bytes_billed / 2**30:.1f} GiB); nothing was "
                    f"billed. Check that the query prunes (a read by id without a recorded load, a long sweep "
                    f"horizon or lookback reads more partitions), then raise source.maximum_bytes_billed if the "
                    f"scan is expected. BigQuery said: {error}") from error
            raise
        self.cost.add(bytes_processed=job.total_bytes_processed, query_id=job.job_id)
        log.debug("bigquery job %s: %s bytes processed", job.job_id, job.total_bytes_processed)
        return rows

    def _scalar(self, sql: str, params: list) -> int:
        rows = list(self._query(sql, params))
        return int(rows[0][0])

    def _scopes(self, table: Any, request: ReadRequest) -> Iterator[tuple[str, list]]:
        from google.cloud import bigquery

        partition = request.partition
        bucket, bucket_params = "", []
        if partition.buckets > 1:
            # FARM_FINGERPRINT is stable; MOD before ABS, because ABS of the smallest INT64 overflows.
            bucket = " AND ABS(MOD(FARM_FINGERPRINT(`id`), @buckets)) = @bucket"
            bucket_params = [bigquery.ScalarQueryParameter("buckets", "INT64", partition.buckets),
                             bigquery.ScalarQueryParameter("bucket", "INT64", partition.bucket)]
        if request.ids is None:
            assert request.window is not None, "a read names a window or ids"
            scope, params = _window_scope(table, request.window, request.loaded_at_column)
            yield scope + bucket, params + bucket_params
            return
        since, since_params = "", []
        if request.loaded_since is not None:
            # Chosen ids loaded since a known time: pruned like a window (partitions and loaded-at).
            scope, since_params = _loaded_scope(table, request.loaded_at_column, request.loaded_since)
            since = f" AND {scope}"
        ids = list(dict.fromkeys(request.ids))
        for start in range(0, len(ids), IDS_PER_QUERY):
            batch = bigquery.ArrayQueryParameter("ids", "STRING", ids[start:start + IDS_PER_QUERY])
            yield "`id` IN UNNEST(@ids)" + since + bucket, [batch, *since_params, *bucket_params]


def _window_scope(table: Any, window: Window, loaded_at_column: str) -> tuple[str, list]:
    """The window on the loaded-at column, plus partition pruning where the table allows it."""
    return _loaded_scope(table, loaded_at_column, window.scan_start, window.end)


def _loaded_scope(table: Any, loaded_at_column: str, since: datetime, until: datetime | None = None
                  ) -> tuple[str, list]:
    """Rows loaded in ``[since, until)`` (``until`` None: no upper bound), plus partition pruning
    where the table allows it."""
    from google.cloud import bigquery

    fields = {field.name.lower(): field for field in table.schema}
    if loaded_at_column not in fields:
        raise ValueError(f"source.loaded_at_column: {table.full_table_id} has no column {loaded_at_column!r}")
    field = fields[loaded_at_column]
    if field.field_type not in ("TIMESTAMP", "DATETIME"):
        raise ValueError(f"source.loaded_at_column: {table.full_table_id}.{field.name} is {field.field_type}, "
                         f"not a timestamp")
    kind = field.field_type
    column = quote(field.name)

    def value(bound: datetime) -> datetime:
        bound = bound.astimezone(UTC)
        return bound.replace(tzinfo=None) if kind == "DATETIME" else bound  # a zone-less column holds UTC wall time

    scope = f"{column} >= @scan_start"
    params = [bigquery.ScalarQueryParameter("scan_start", kind, value(since))]
    if until is not None:
        scope += f" AND {column} < @end"
        params.append(bigquery.ScalarQueryParameter("end", kind, value(until)))
    partitioning = table.time_partitioning
    if partitioning is not None and partitioning.field is None:
        # Ingestion-time partitions (Segment's): a row is ingested after it was staged or received.
        scope += " AND _PARTITIONTIME >= TIMESTAMP_TRUNC(@scan_start_ts, DAY)"
        params.append(bigquery.ScalarQueryParameter("scan_start_ts", "TIMESTAMP", since.astimezone(UTC)))
    return scope, params
