"""The ledger: one row per (destination, idempotency key), saying delivered or rejected, and why.

It is what makes reruns, overlapping runs and backfills safe. The protocol is check -> send -> mark:

1. **check**: the extraction leaves out events the ledger has as delivered. When the ledger lives in
   the warehouse's database (the default) this is a ``NOT EXISTS`` inside the extraction query, so
   delivered rows never even leave the database; otherwise one indexed lookup per chunk of keys.
   Never is the whole set of delivered keys loaded into Python.
2. **send** the rest.
3. **mark** ``delivered`` (one upsert per batch of confirmed keys) only after the destination
   accepted them; ``rejected`` with the reason when the mapping or the destination refused them.
   A ``delivered`` row is never downgraded.

Overlapping runs are serialised per (destination, partition) by :meth:`Ledger.lock` (a PostgreSQL
advisory lock, released by PostgreSQL itself if the task process dies), so the second run's check
sees what the first delivered. A crash between 2 and 3 leaves confirmed-but-unmarked events; the
next attempt sends them again with the same idempotency keys, which the destination de-duplicates.

Supported ledger databases: PostgreSQL and SQLite (the embedded demo).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from usage_billing.destinations.base import Rejection, timestamp_array
from usage_billing.naming import check_identifier

DELIVERED, REJECTED = "delivered", "rejected"
MAX_REASON = 2000
# Event timestamps travel as epoch microseconds (Ledger._timestamps); this turns them back in SQL.
_FROM_MICROS = "TIMESTAMPTZ 'epoch' + micros * INTERVAL '1 microsecond'"


def _key_type(length: int) -> sa.types.TypeEngine:
    """Keys compare byte-wise ("C" collation) on PostgreSQL: the primary-key index is written and
    probed once per event, and locale-aware comparison would cost several times more."""
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def _columns() -> list[sa.Column]:
    return [
        sa.Column("destination", _key_type(32), primary_key=True),
        sa.Column("idempotency_key", _key_type(255), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("message_id", sa.String(255)),
        sa.Column("event_table", sa.String(128)),
        sa.Column("event_timestamp", sa.DateTime(timezone=True)),
        sa.Column("first_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("backfill_id", sa.String(100)),
        sa.Column("mode", sa.String(16)),
    ]


def _history_columns() -> list[sa.Column]:
    """Earlier deliveries of an event, kept when replace mode delivers it again."""
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("backfill_id", sa.String(100)),
        sa.Column("mode", sa.String(16)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("superseded_at", sa.DateTime(timezone=True)),
        sa.Column("superseded_by_run", sa.String(250)),
    ]


def _backfill_columns() -> list[sa.Column]:
    """Orb backfills this pipeline created or used, and what became of them."""
    return [
        sa.Column("destination", sa.String(32), primary_key=True),
        sa.Column("backfill_id", sa.String(100), primary_key=True),
        sa.Column("timeframe_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("timeframe_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replace_existing_events", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("events_sent", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("closed_at", sa.DateTime(timezone=True)),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
    ]


@dataclass(frozen=True)
class EventRefs:
    """The events a mark records, column-wise."""

    keys: Sequence[str]
    message_ids: Sequence[str]
    tables: Sequence[str]
    timestamps: np.ndarray | Sequence[datetime | None]
    customer_ids: Sequence[str | None] | None = None
    event_names: Sequence[str | None] | None = None


@dataclass(frozen=True)
class Route:
    """How events reached the destination: ``ingest`` (live), ``backfill`` or ``replace``."""

    mode: str = "ingest"
    backfill_id: str | None = None


@dataclass(frozen=True)
class RunRef:
    """Who is delivering: written on every ledger row the run touches."""

    dag_id: str
    run_id: str



class Ledger:
    """The delivered / rejected record in the ledger database (schema ``usage_billing``)."""

    def __init__(self, engine: Engine, schema: str = "usage_billing"):
        self.engine = engine
        self.schema = check_identifier(schema, "ledger.schema")
        metadata = sa.MetaData(schema=self.schema)
        self.table = sa.Table("deliveries", metadata, *_columns(),
                              # Only rejected rows need finding by status; delivered ones are found by key.
                              sa.Index("ix_deliveries_rejected", "destination", "event_table",
                                       postgresql_where=sa.text(f"status = '{REJECTED}'"),
                                       sqlite_where=sa.text(f"status = '{REJECTED}'")))
        self.history = sa.Table("delivery_history", metadata, *_history_columns(),
                                sa.Index("ix_delivery_history_key", "destination", "idempotency_key"))
        self.backfills = sa.Table("backfills", metadata, *_backfill_columns())
        self._sqlite = engine.dialect.name == "sqlite"
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise ValueError(f"ledger.conn_id: the ledger needs PostgreSQL or SQLite, not {engine.dialect.name}")
        self._name = f'"{self.schema}".deliveries'

    # -- setup ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Create the schema and table if missing; safe when several tasks start at once."""
        with self.engine.begin() as conn:
            if not self._sqlite:
                # Concurrent CREATE ... IF NOT EXISTS can still collide in PostgreSQL's catalog.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('usage_billing.ledger.ddl'))"))
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            self.table.metadata.create_all(conn, checkfirst=True)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lock shared by every task using this ledger (PostgreSQL advisory lock, or a file lock
        next to the SQLite database), held across HTTP calls; used to serialise Orb backfills."""
        if self._sqlite:
            path = Path(self.engine.url.database or "ledger.db").with_suffix(f".{_safe(name)}.lock")
            with open(path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        # A connection of its own, outside the pool: waiting for the lock must not starve the
        # pool the lock holder needs for its ledger writes.
        locks = sa.create_engine(self.engine.url, poolclass=sa.pool.NullPool)
        with locks.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(hashtext(:name))"), {"name": f"{self.schema}:{name}"})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:name))"), {"name": f"{self.schema}:{name}"})
                conn.commit()
        locks.dispose()

    def record_backfill(self, destination: str, backfill: dict, run: RunRef, events_sent: int = 0) -> None:
        """Insert or update the record of an Orb backfill (its id, timeframe and status)."""
        values = {
            "destination": destination, "backfill_id": backfill["id"],
            "timeframe_start": _parse_time(backfill["timeframe_start"]),
            "timeframe_end": _parse_time(backfill["timeframe_end"]),
            "replace_existing_events": bool(backfill.get("replace_existing_events")),
            "status": backfill.get("status") or "pending",
            "created_at": _parse_time(backfill.get("created_at")),
            "closed_at": _parse_time(backfill.get("close_time")) if backfill.get("status") == "reflected" else None,
            "dag_id": run.dag_id, "run_id": run.run_id,
        }
        with self.engine.begin() as conn:
            updated = conn.execute(
                self.backfills.update()
                .where(self.backfills.c.destination == destination, self.backfills.c.backfill_id == backfill["id"])
                .values(status=values["status"], closed_at=values["closed_at"],
                        events_sent=self.backfills.c.events_sent + events_sent)).rowcount
            if not updated:
                conn.execute(self.backfills.insert().values(**values, events_sent=events_sent))

    def backfill_records(self, destination: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.backfills).where(self.backfills.c.destination == destination)
                                .order_by(self.backfills.c.timeframe_start))
            return [dict(row._mapping) for row in rows]

    # -- the protocol ----------------------------------------------------------------------------

    def _t(self, value: datetime) -> datetime | str:
        # SQLite stores timestamps as text: keep one sortable format for comparisons.
        # (SQLAlchemy's own SQLite DATETIME format, so typed queries compare correctly).
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if self._sqlite else value

    def _array(self, values: Sequence[object]) -> object:
        """A bind value for ``CAST(:x AS type[])``: one array literal on PostgreSQL (psycopg2 would
        otherwise inline every element into the SQL text, which PostgreSQL then has to parse), JSON
        for SQLite's json_each."""
        if self._sqlite:
            return json.dumps(list(values))
        if not values:
            return "{}"
        try:  # the common case, strings without quotes or backslashes: one join, no per-element work
            joined = '","'.join(values)  # type: ignore[arg-type]
        except TypeError:
            joined = None
        if joined is not None and "\\" not in joined and joined.count('"') == 2 * (len(values) - 1):
            return '{"' + joined + '"}'
        return "{" + ",".join("NULL" if v is None else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
                              for v in values) + "}"

    def _timestamps(self, values: Sequence[datetime | None] | np.ndarray) -> object:
        """Event timestamps for one statement, formatted by numpy rather than per event in Python:
        microseconds since the epoch as a ``bigint[]`` literal on PostgreSQL, a list of SQLite's
        text format otherwise."""
        stamps = timestamp_array(values)
        missing = np.isnat(stamps)
        if self._sqlite:
            text = np.char.replace(np.datetime_as_string(stamps, unit="us"), "T", " ").astype(object)
            text[missing] = None
            return text.tolist()
        micros = stamps.astype(np.int64).astype(str)
        micros[missing] = "NULL"
        return "{" + ",".join(micros.tolist()) + "}"

    def refresh_statistics(self) -> bool:
        """ANALYZE the deliveries table when its statistics are stale (PostgreSQL only).

        The ledger filter's plan depends on them: without, PostgreSQL may hash the destination's
        whole ledger for every partition instead of probing its primary key. Autovacuum usually
        keeps them fresh; this covers a ledger written faster than it runs, or a server that has it
        off. Stale means autovacuum's own default rule: more rows changed since the last ANALYZE
        than 50 plus 10% of the table.
        """
        if self._sqlite:
            return False
        with self.engine.connect() as conn:
            changed, rows = conn.execute(sa.text(
                "SELECT s.n_mod_since_analyze, c.reltuples FROM pg_stat_user_tables s "
                "JOIN pg_class c ON c.oid = s.relid WHERE s.schemaname = :schema AND s.relname = :table"),
                {"schema": self.schema, "table": self.table.name}).one_or_none() or (0, 0)
        if changed <= 50 + 0.1 * max(rows, 0):
            return False
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"ANALYZE {self._name}"))
        return True

    def skipped_statuses(self, retry_rejected: bool) -> tuple[str, ...]:
        return (DELIVERED,) if retry_rejected else (DELIVERED, REJECTED)

    def known_keys(self, destination: str, keys: Sequence[str], retry_rejected: bool = True) -> set[str]:
        """The keys among ``keys`` that need no sending: delivered (and rejected, unless
        ``retry_rejected``). One indexed lookup for a chunk of keys."""
        if not keys:
            return set()
        params: dict = {"destination": destination}
        where = self._in_keys(params, keys)
        statuses = ", ".join(f"'{s}'" for s in self.skipped_statuses(retry_rejected))
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT idempotency_key FROM {self._name} WHERE destination = :destination "
                                        f"AND status IN ({statuses}) AND {where}"), params)
            return {row[0] for row in rows}

    def _archive(self, destination: str, keys: Sequence[str], run: RunRef, now: datetime) -> None:
        """Copy the current delivery of these keys into delivery_history before they are re-sent."""
        params: dict = {"destination": destination, "now": self._t(now), "run_id": run.run_id}
        where = self._in_keys(params, keys)
        with self.engine.begin() as conn:
            conn.execute(sa.text(
                f'INSERT INTO "{self.schema}".delivery_history (destination, idempotency_key, status, reason, '
                f"delivered_at, backfill_id, mode, run_id, superseded_at, superseded_by_run) "
                f"SELECT destination, idempotency_key, status, reason, delivered_at, backfill_id, mode, run_id, "
                f":now, :run_id FROM {self._name} WHERE destination = :destination AND status = '{DELIVERED}' "
                f"AND {where}"), params)

    def history_of(self, destination: str, key: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.history).where(
                self.history.c.destination == destination, self.history.c.idempotency_key == key)
                .order_by(self.history.c.id))
            return [dict(row._mapping) for row in rows]

    def _in_keys(self, params: dict, keys: Sequence[str]) -> str:
        params["keys"] = self._array(keys)
        if self._sqlite:
            return "idempotency_key IN (SELECT value FROM json_each(:keys))"
        return "idempotency_key = ANY(CAST(:keys AS text[]))"

    def known_clause(self, destination: str, key: sa.ColumnElement, retry_rejected: bool = True
                     ) -> sa.ColumnElement[bool]:
        """"The ledger already has this event" (delivered, or also rejected), for a warehouse query."""
        deliveries = self.table.c
        if not isinstance(key.type, sa.String):
            key = sa.cast(key, sa.String)
        if self.engine.dialect.name == "postgresql":
            key = sa.collate(key, "C")  # the ledger's key collation, so its primary-key index is used
        return sa.exists().where(deliveries.destination == destination, deliveries.idempotency_key == key,
                                 deliveries.status.in_(self.skipped_statuses(retry_rejected)))

    def mark_delivered(self, destination: str, run: RunRef, events: EventRefs, now: datetime,
                       route: Route = Route()) -> None:
        """Record events the destination accepted. Call only after the destination confirmed them.

        ``mode`` says how: ``ingest`` (live), ``backfill`` (inside an Orb backfill, for events past
        the grace period) or ``replace`` (a replace-mode backfill: the earlier delivery of each key
        is first copied into ``delivery_history``)."""
        keys, message_ids, tables, timestamps = events.keys, events.message_ids, events.tables, events.timestamps
        backfill_id, mode = route.backfill_id, route.mode
        if not keys:
            return
        if mode == "replace":
            self._archive(destination, keys, run, now)
        params = {"destination": destination, "now": self._t(now), "dag_id": run.dag_id, "run_id": run.run_id,
                  "backfill_id": backfill_id, "mode": mode}
        columns = ("destination, idempotency_key, status, attempts, message_id, event_table, event_timestamp, "
                   "first_attempt_at, last_attempt_at, delivered_at, dag_id, run_id, backfill_id, mode")
        upsert = f"""
            ON CONFLICT (destination, idempotency_key) DO UPDATE SET
                status = '{DELIVERED}', reason = NULL, attempts = {self._name}.attempts + 1,
                last_attempt_at = excluded.last_attempt_at, delivered_at = excluded.delivered_at,
                dag_id = excluded.dag_id, run_id = excluded.run_id, backfill_id = excluded.backfill_id,
                mode = excluded.mode, message_id = excluded.message_id, event_table = excluded.event_table,
                event_timestamp = excluded.event_timestamp"""
        if self._sqlite:
            sql = f"""INSERT INTO {self._name} ({columns})
                SELECT :destination, json_extract(value, '$[0]'), '{DELIVERED}', 1, json_extract(value, '$[1]'),
                       json_extract(value, '$[2]'), json_extract(value, '$[3]'), :now, :now, :now, :dag_id,
                       :run_id, :backfill_id, :mode
                FROM json_each(:rows) WHERE true {upsert}"""
            params["rows"] = json.dumps(list(zip(keys, message_ids, tables, self._timestamps(timestamps),
                                                 strict=True)))
        else:
            sql = f"""INSERT INTO {self._name} ({columns})
                SELECT :destination, k, '{DELIVERED}', 1, m, t, {_FROM_MICROS}, :now, :now, :now, :dag_id, :run_id,
                       :backfill_id, :mode
                FROM unnest(CAST(:keys AS text[]), CAST(:ids AS text[]), CAST(:tables AS text[]),
                            CAST(:stamps AS bigint[])) AS u(k, m, t, micros)
                ORDER BY k  -- one lock order for every writer: concurrent writes cannot deadlock"""
            params.update(keys=self._array(keys), ids=self._array(message_ids), tables=self._array(tables),
                          stamps=self._timestamps(timestamps))
            if mode != "replace":
                # Usually none of the keys is in the ledger yet, and a plain INSERT costs PostgreSQL
                # about a third less than an upsert; if one is there, the batch is upserted instead.
                try:
                    with self.engine.begin() as conn:
                        conn.execute(sa.text(sql), params)
                    return
                except sa.exc.IntegrityError:
                    pass
            sql += upsert
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params)

    def mark_rejected(self, destination: str, run: RunRef, rejections: Iterable[Rejection], now: datetime) -> None:
        """Record rejected events with their reason; a delivered event is never downgraded."""
        # One row per key: a key twice in one statement would make ON CONFLICT fail.
        latest = list({r.key: r for r in rejections}.values())
        if not latest:
            return
        keys, ids, tables = [r.key for r in latest], [r.message_id for r in latest], [r.table for r in latest]
        reasons = [r.reason[:MAX_REASON] for r in latest]
        stamps = self._timestamps([r.event_timestamp for r in latest])
        params = {"destination": destination, "now": self._t(now), "dag_id": run.dag_id, "run_id": run.run_id}
        upsert = f"""
            ON CONFLICT (destination, idempotency_key) DO UPDATE SET
                status = '{REJECTED}', reason = excluded.reason, attempts = {self._name}.attempts + 1,
                last_attempt_at = excluded.last_attempt_at, dag_id = excluded.dag_id, run_id = excluded.run_id,
                message_id = COALESCE(NULLIF(excluded.message_id, ''), {self._name}.message_id),
                event_table = COALESCE(NULLIF(excluded.event_table, ''), {self._name}.event_table),
                event_timestamp = COALESCE(excluded.event_timestamp, {self._name}.event_timestamp)
            WHERE {self._name}.status <> '{DELIVERED}'"""
        columns = ("destination, idempotency_key, status, reason, attempts, message_id, event_table, "
                   "event_timestamp, first_attempt_at, last_attempt_at, dag_id, run_id")
        if self._sqlite:
            sql = f"""INSERT INTO {self._name} ({columns})
                SELECT :destination, json_extract(value, '$[0]'), '{REJECTED}', json_extract(value, '$[4]'), 1,
                       json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[3]'),
                       :now, :now, :dag_id, :run_id
                FROM json_each(:rows) WHERE true {upsert}"""
            params["rows"] = json.dumps(list(zip(keys, ids, tables, stamps, reasons, strict=True)))
        else:
            sql = f"""INSERT INTO {self._name} ({columns})
                SELECT :destination, k, '{REJECTED}', r, 1, m, t, {_FROM_MICROS}, :now, :now, :dag_id, :run_id
                FROM unnest(CAST(:keys AS text[]), CAST(:ids AS text[]), CAST(:tables AS text[]),
                            CAST(:stamps AS bigint[]), CAST(:reasons AS text[])) AS u(k, m, t, micros, r)
                ORDER BY k  -- the same lock order as mark_delivered: writers cannot deadlock
                {upsert}"""
            params.update(keys=self._array(keys), ids=self._array(ids), tables=self._array(tables), stamps=stamps,
                          reasons=self._array(reasons))
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params)

    # -- reading ---------------------------------------------------------------------------------

    def counts(self, destination: str | None = None) -> dict[str, dict[str, int]]:
        """``{destination: {status: count}}``."""
        query = f"SELECT destination, status, count(*) FROM {self._name}"
        params = {}
        if destination:
            query += " WHERE destination = :destination"
            params["destination"] = destination
        result: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for dest, status, count in conn.execute(sa.text(query + " GROUP BY destination, status"), params):
                result.setdefault(dest, {})[status] = count
        return result

    def rejected_reasons(self, destination: str, limit: int = 20) -> list[tuple[str, int]]:
        """Rejection reasons with their counts, most frequent first (row ids stripped for grouping)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(
                f"SELECT reason FROM {self._name} WHERE destination = :destination AND status = '{REJECTED}'"),
                {"destination": destination})
            counter = Counter(_generic_reason(reason) for (reason,) in rows)
        return counter.most_common(limit)

    def rejected(self, destination: str, reason_contains: str | None = None,
                 limit: int | None = None) -> list[dict]:
        """Rejected events (key, message id, table, timestamp, reason, attempts), oldest first."""
        params: dict = {}
        query = (f"SELECT idempotency_key, message_id, event_table, event_timestamp, reason, attempts, "
                 f"last_attempt_at FROM {self._name} WHERE {self._rejected(params, destination, reason_contains)}"
                 f" ORDER BY event_timestamp, idempotency_key")
        if limit:
            query += f" LIMIT {int(limit)}"
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text(query), params)]

    @staticmethod
    def _rejected(params: dict, destination: str, reason_contains: str | None) -> str:
        """The WHERE clause of "this destination's rejected events", optionally by reason text."""
        params["destination"] = destination
        clause = f"destination = :destination AND status = '{REJECTED}'"
        if reason_contains:
            params["pattern"] = f"%{reason_contains}%"
            clause += " AND reason LIKE :pattern"
        return clause

    def delivered_between(self, destination: str, start: datetime, end: datetime) -> int:
        """Delivered events whose event timestamp lies in ``[start, end)``."""
        t = self.table.c
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(
                t.destination == destination, t.status == DELIVERED, t.event_timestamp >= start,
                t.event_timestamp < end)).scalar_one())

    def rejected_tables(self, destination: str, reason_contains: str | None = None) -> list[str]:
        """Event tables that hold rejected events of a destination."""
        params: dict = {}
        query = (f"SELECT DISTINCT event_table FROM {self._name} WHERE "
                 f"{self._rejected(params, destination, reason_contains)} "
                 f"AND event_table IS NOT NULL AND event_table <> ''")
        with self.engine.connect() as conn:
            return sorted(row[0] for row in conn.execute(sa.text(query), params))

    def status_of(self, destination: str, keys: Sequence[str]) -> dict[str, str]:
        params: dict = {"destination": destination}
        where = self._in_keys(params, keys)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT idempotency_key, status FROM {self._name} "
                                        f"WHERE destination = :destination AND {where}"), params)
            return dict(rows.all())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:80]


def _parse_time(value: object) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _generic_reason(reason: str | None) -> str:
    """'api_call row id=ajs-1: no external customer ID ...' -> 'no external customer ID ...'."""
    if not reason:
        return "(no reason)"
    head, sep, tail = reason.partition(": ")
    return tail if sep and " row id=" in head else reason
