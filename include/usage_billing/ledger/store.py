"""The ledger: one row per (destination, idempotency key), saying delivered or rejected, and why.

It is what makes reruns, overlapping runs and backfills safe. The protocol is check -> send -> mark:

1. **check**: the extraction leaves out events the ledger has as delivered. When the ledger lives in
   the warehouse's database (the default) this is :meth:`Ledger.known_clause`, a ``NOT EXISTS``
   inside the extraction query, so delivered rows never even leave the database; otherwise
   :meth:`Ledger.known_keys`, one indexed lookup per chunk of keys. Never is the whole set of
   delivered keys loaded into Python.
2. **send** the rest.
3. **mark** ``delivered`` (one upsert per batch of confirmed keys) only after the destination
   accepted them; ``rejected`` with the reason when the mapping or the destination refused them.
   A ``delivered`` row is never downgraded.

Overlapping runs are serialised per (destination, partition) by :meth:`Ledger.lock` (a PostgreSQL
advisory lock, released by PostgreSQL itself if the task process dies), so the second run's check
sees what the first delivered. A crash between 2 and 3 leaves confirmed-but-unmarked events; the
next attempt sends them again with the same idempotency keys, which the destination de-duplicates.

Every statement is SQLAlchemy Core, written once for PostgreSQL and SQLite (the embedded demo).
The one place the dialects differ is where a batch of rows comes from: a mark is a single
``INSERT ... SELECT ... ON CONFLICT`` whose rows are ``unnest()`` of one array literal per column on
PostgreSQL, ``json_each()`` of one JSON document on SQLite (:meth:`Ledger._rows`). Measured on
PostgreSQL, 200,000 new keys in 5,000-key marks: 1.4 s this way, as fast as the hand-written SQL
before it (1.3 s); 13 s with Core's executemany ("insertmanyvalues", one rendered parameter set per
row, and a Python dict per row to fill it), and 39 s against 3.1 s when every key is already there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from usage_billing.ledger.tables import DELIVERED, HELD, LOST, QUEUED, REJECTED, RetryRejected, ledger_tables
from usage_billing.naming import check_identifier

if TYPE_CHECKING:
    import numpy as np

    from usage_billing.destinations.base import Rejection

log = logging.getLogger(__name__)

MAX_REASON = 2000
# What the sweep counts per event day: the columns of ``day_counts`` besides who counted and when.
DAY_COUNTS = ("warehouse", "delivered", "rejected", "held")
# Event timestamps travel to PostgreSQL as epoch microseconds (a bigint[]), turned back in SQL.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Held while migrating, by this and by the unversioned ledger's create(): old and new tasks take turns.
_DDL_LOCK = "usage_billing.ledger.ddl"
_SqlType = sa.types.TypeEngine | type[sa.types.TypeEngine]


@dataclass(frozen=True)
class RunRef:
    """Who is delivering: written on every ledger row the run touches."""

    dag_id: str
    run_id: str


@dataclass(frozen=True)
class EventRefs:
    """The events one mark records, column by column (``keys[i]`` goes with ``message_ids[i]``...).

    ``timestamps`` may be a UTC ``datetime64[us]`` array (see ``destinations.base.timestamp_array``),
    so a million events are recorded without a Python datetime each. ``customer_ids`` and
    ``event_names`` are optional: a mark without them leaves what the ledger has.
    """

    keys: Sequence[str]
    message_ids: Sequence[str]
    tables: Sequence[str]
    timestamps: np.ndarray | Sequence[datetime | None]
    customer_ids: Sequence[str | None] | None = None
    event_names: Sequence[str | None] | None = None

    def __post_init__(self) -> None:
        # PostgreSQL's unnest() would pad a short column with NULLs rather than fail.
        lengths = {len(column) for column in (self.keys, self.message_ids, self.tables, self.timestamps,
                                              self.customer_ids, self.event_names) if column is not None}
        if len(lengths) > 1:
            raise ValueError(f"EventRefs: columns of different lengths {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class Route:
    """How events reached the destination: ``ingest`` (live), ``backfill`` (inside an Orb backfill,
    for events past the grace period) or ``replace`` (a replace-mode backfill: the earlier delivery
    of each key is first copied into ``delivery_history``)."""

    mode: str = "ingest"
    backfill_id: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("ingest", "backfill", "replace"):
            raise ValueError(f"Route.mode: {self.mode!r} is not ingest, backfill or replace")


class Ledger:
    """The delivered / rejected record in the ledger database (schema ``usage_billing``)."""

    def __init__(self, engine: Engine, schema: str = "usage_billing"):
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise ValueError(f"ledger.conn_id: the ledger needs PostgreSQL or SQLite, not {engine.dialect.name}")
        self.engine = engine
        self.schema = check_identifier(schema, "ledger.schema")
        tables = ledger_tables(self.schema)
        self.table, self.history, self.backfills = tables.deliveries, tables.history, tables.backfills
        self.findings_table, self.day_counts_table = tables.findings, tables.day_counts
        self._sqlite = engine.dialect.name == "sqlite"

    # -- setup ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Create the ledger, or upgrade it to the newest revision; safe when several tasks start
        at once (they take turns on a lock, and the second finds nothing to do)."""
        from usage_billing.ledger import migrate  # Alembic, imported by the tasks that create

        revision = self.current_revision()
        if revision == migrate.head():
            return  # every task calls this: the common case takes no lock
        if migrate.is_newer(revision):
            log.warning("ledger %s is at revision %s, newer than this code's %s: left as it is",
                        self.schema, revision, migrate.head())
            return
        if self._sqlite:
            with self.lock("ddl"), self.engine.begin() as conn:
                migrate.upgrade(conn, self.schema)
            return
        with self.engine.begin() as conn:
            # Concurrent DDL can collide in PostgreSQL's catalog, even with IF NOT EXISTS.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(_DDL_LOCK))))
            conn.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
            migrate.upgrade(conn, self.schema)

    def current_revision(self) -> str | None:
        """The migration the ledger's tables are at (None: not created, or created before versioning)."""
        from usage_billing.ledger import migrate

        with self.engine.connect() as conn:
            return migrate.current_revision(conn, self.schema)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lock shared by every task using this ledger (PostgreSQL advisory lock, or a file lock
        next to the SQLite database), held across HTTP calls; used to serialise Orb backfills.

        The lock's key includes the ledger schema: deployments with ledgers of their own in one
        database do not wait for each other."""
        if self._sqlite:
            path = Path(self.engine.url.database or "ledger.db").with_suffix(f".{_safe(f'{self.schema}.{name}')}.lock")
            with open(path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        key = sa.func.hashtext(sa.literal(f"{self.schema}:{name}", sa.Text))
        # A connection of its own, outside the pool: waiting for the lock must not starve the
        # pool the lock holder needs for its ledger writes.
        locks = sa.create_engine(self.engine.url, poolclass=sa.pool.NullPool)
        try:
            with locks.connect() as conn:
                conn.execute(sa.select(sa.func.pg_advisory_lock(key)))
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
                    conn.commit()
        finally:
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

    def backfill_records(self, destination: str | None = None) -> list[dict]:
        """The recorded Orb backfills of ``destination`` (None: of every destination), by timeframe."""
        query = sa.select(self.backfills).order_by(self.backfills.c.timeframe_start)
        if destination is not None:
            query = query.where(self.backfills.c.destination == destination)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def refresh_statistics(self) -> bool:
        """ANALYZE the deliveries table when its statistics are stale (PostgreSQL only).

        The ledger filter's plan depends on them: without, PostgreSQL may hash the destination's
        whole ledger for every partition instead of probing its primary key. Autovacuum usually
        keeps them fresh; this covers a ledger written faster than it runs, or a server that has it
        off. Stale means autovacuum's own default rule: more rows changed since the last ANALYZE
        than 50 plus 10% of the table.

        Called after delivering (the DAG's report task, the sweep), never before a delivery inside a
        deliver task: an ANALYZE of a ledger of a million rows took 0.3 to 0.7 s here, paid by the first
        partition of the run after a large one. The next run's filter is the one that needs them.
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
            conn.execute(sa.text(f"ANALYZE {conn.dialect.identifier_preparer.format_table(self.table)}"))
        return True

    # -- the check ---------------------------------------------------------------------------------

    def known_clause(self, destination: str, key: sa.ColumnElement, retry: RetryRejected,
                     loaded_at: sa.ColumnElement | None = None) -> sa.ColumnElement[bool]:
        """"The ledger already has this event" for a query in the ledger's own database: ``key`` is
        the event's idempotency-key column there, ``loaded_at`` its row's loaded-at column; negate
        the clause to keep the events to send.

        Delivered events are known. Rejected ones are known unless ``retry`` is ALWAYS; with
        RELOADED, only while the row's loaded-at is not later than the one they were rejected at
        (a row loaded again is tried again)."""
        if not isinstance(key.type, sa.String):
            key = sa.cast(key, sa.String)
        if not self._sqlite:
            key = sa.collate(key, "C")  # the ledger's key collation, so its primary-key index is used
        t = self.table.c
        settled = t.status == DELIVERED
        if retry is RetryRejected.NEVER:
            settled = t.status.in_((DELIVERED, REJECTED))
        elif retry is RetryRejected.RELOADED and loaded_at is not None:
            rejected_at = t.row_loaded_at
            if self._sqlite:  # stored text in two formats (ours, the warehouse's): compare instants
                rejected_at, loaded_at = sa.func.julianday(rejected_at), sa.func.julianday(loaded_at)
            settled = sa.or_(settled, sa.and_(t.status == REJECTED, rejected_at >= loaded_at))
        return sa.exists().where(t.destination == destination, t.idempotency_key == key, settled)

    def known_keys(self, destination: str, keys: Sequence[str], retry: RetryRejected,
                   loaded_at: Sequence[datetime | None] | np.ndarray | None = None) -> set[str]:
        """The keys among ``keys`` that need no sending, as :meth:`known_clause` says
        (``loaded_at[i]``: the loaded-at of the row of ``keys[i]``, datetimes or ``datetime64``).
        One indexed lookup for a chunk of keys."""
        if not keys:
            return set()
        t = self.table.c
        statuses = (DELIVERED,) if retry is RetryRejected.ALWAYS else (DELIVERED, REJECTED)
        query = sa.select(t.idempotency_key, t.status, t.row_loaded_at).where(
            t.destination == destination, t.status.in_(statuses), self._among(t.idempotency_key, keys))
        with self.engine.connect() as conn:
            found = conn.execute(query).all()
        known = {key for key, status, _ in found if status == DELIVERED or retry is RetryRejected.NEVER}
        rejected = [(key, at) for key, status, at in found if status == REJECTED]
        if retry is RetryRejected.RELOADED and rejected and loaded_at is not None:
            position = {key: i for i, key in enumerate(keys)}
            known.update(key for key, at in rejected
                         if unchanged_since(_aware(at), _aware(_item(loaded_at[position[key]]))))
        return known

    def rejected_loads(self, destination: str, keys: Sequence[str]) -> dict[str, datetime | None]:
        """For the keys the ledger holds as rejected: their row's loaded-at when they were rejected."""
        t = self.table.c
        query = sa.select(t.idempotency_key, t.row_loaded_at).where(
            t.destination == destination, t.status == REJECTED, self._among(t.idempotency_key, keys))
        with self.engine.connect() as conn:
            return {key: _aware(at) for key, at in conn.execute(query)}

    def status_of(self, destination: str, keys: Sequence[str]) -> dict[str, str]:
        t = self.table.c
        query = sa.select(t.idempotency_key, t.status).where(t.destination == destination,
                                                              self._among(t.idempotency_key, keys))
        with self.engine.connect() as conn:
            return dict(conn.execute(query).tuples().all())

    def _among(self, column: sa.ColumnElement, keys: Sequence[str]) -> sa.ColumnElement[bool]:
        """``column`` is one of ``keys``, with one bound value however many keys: ``= ANY`` of an
        array on PostgreSQL, ``IN`` a ``json_each`` on SQLite (whose statements take at most 32,766
        parameters, fewer than a chunk's keys)."""
        if self._sqlite:
            values = sa.bindparam("keys", json.dumps(list(keys)), type_=sa.Text)
            return column.in_(sa.select(sa.func.json_each(values).table_valued("value").c.value))
        return column == sa.any_(sa.cast(sa.bindparam("keys", _array_literal(keys), type_=sa.Text),
                                         postgresql.ARRAY(sa.Text)))

    # -- the mark ----------------------------------------------------------------------------------

    def mark_delivered(self, destination: str, run: RunRef, events: EventRefs, now: datetime,
                       route: Route = Route()) -> None:
        """Record events the destination accepted. Call only after the destination confirmed them;
        ``route`` says how they were sent (replace mode archives each key's earlier delivery first)."""
        if not len(events):
            return
        if route.mode == "replace":
            self._archive(destination, events.keys, run, now)
        columns = {"key": (events.keys, sa.Text), "message_id": (events.message_ids, sa.Text),
                   "table": (events.tables, sa.Text), "stamp": self._stamps(events.timestamps)}
        if events.customer_ids is not None:
            columns["customer_id"] = (events.customer_ids, sa.Text)
        if events.event_names is not None:
            columns["event_name"] = (events.event_names, sa.Text)
        rows = self._rows(columns)
        now = self._bind_time(now)
        values = {
            "destination": sa.literal(destination), "idempotency_key": rows["key"], "status": sa.literal(DELIVERED),
            "attempts": sa.literal(1), "message_id": rows["message_id"], "event_table": rows["table"],
            "event_timestamp": self._stamp_column(rows["stamp"]),
            "customer_id": rows.get("customer_id", sa.null()), "event_name": rows.get("event_name", sa.null()),
            "first_attempt_at": now, "last_attempt_at": now, "delivered_at": now,
            "dag_id": sa.literal(run.dag_id), "run_id": sa.literal(run.run_id),
            "backfill_id": sa.literal(route.backfill_id, sa.String), "mode": sa.literal(route.mode),
        }
        t = self.table.c

        def update(excluded: sa.ColumnCollection) -> dict:
            return {
                "status": DELIVERED, "reason": None, "attempts": t.attempts + 1,
                **{name: excluded[name] for name in ("last_attempt_at", "delivered_at", "dag_id", "run_id",
                                                     "backfill_id", "mode", "message_id", "event_table",
                                                     "event_timestamp")},
                # A mark that does not know the customer or event name keeps what the ledger has.
                **{name: sa.func.coalesce(excluded[name], t[name]) for name in ("customer_id", "event_name")},
            }
        # Usually none of the keys is in the ledger yet, and a plain INSERT costs PostgreSQL about a
        # quarter less than an upsert (1.4 s against 1.9 s for 200,000 new keys); if one is there,
        # the batch is upserted instead. A replace re-sends keys that are there by definition.
        self._write(values, rows["key"], update, insert_first=not self._sqlite and route.mode != "replace")

    def mark_rejected(self, destination: str, run: RunRef, rejections: Iterable[Rejection], now: datetime,
                      status: str = REJECTED) -> None:
        """Record rejected events with their reason and billing customer (``Rejection.customer``); a
        delivered event is never downgraded.

        With ``status=HELD`` the events are held instead: not sent yet, for a reason that time ends
        (a timestamp too far in the future), and delivered by a later run once due. With
        ``status=QUEUED`` they wait for their run's backfill (past the grace period)."""
        if status not in (REJECTED, HELD, QUEUED):
            raise ValueError(f"mark_rejected records {REJECTED}, {HELD} or {QUEUED} events, not {status!r}")
        # One row per key: a key twice in one statement would make ON CONFLICT fail.
        latest = list({r.key: r for r in rejections}.values())
        if not latest:
            return
        rows = self._rows({"key": ([r.key for r in latest], sa.Text),
                           "message_id": ([r.message_id for r in latest], sa.Text),
                           "table": ([r.table for r in latest], sa.Text),
                           "stamp": self._stamps([r.event_timestamp for r in latest]),
                           "reason": ([r.reason[:MAX_REASON] for r in latest], sa.Text),
                           "customer": ([r.customer for r in latest], sa.Text),
                           "loaded": self._stamps([r.loaded_at for r in latest])})
        now = self._bind_time(now)
        values = {
            "destination": sa.literal(destination), "idempotency_key": rows["key"], "status": sa.literal(status),
            "reason": rows["reason"], "attempts": sa.literal(1), "message_id": rows["message_id"],
            "event_table": rows["table"], "event_timestamp": self._stamp_column(rows["stamp"]),
            "customer_id": rows["customer"], "row_loaded_at": self._stamp_column(rows["loaded"]),
            "first_attempt_at": now, "last_attempt_at": now,
            "dag_id": sa.literal(run.dag_id), "run_id": sa.literal(run.run_id),
        }
        t = self.table.c

        def update(excluded: sa.ColumnCollection) -> dict:
            return {
                "status": status, "reason": excluded.reason, "attempts": t.attempts + 1,
                "last_attempt_at": excluded.last_attempt_at, "dag_id": excluded.dag_id, "run_id": excluded.run_id,
                # The row as it is now: a row re-rejected for having lost its customer has none.
                "customer_id": excluded.customer_id,
                **{name: sa.func.coalesce(sa.func.nullif(excluded[name], ""), t[name])
                   for name in ("message_id", "event_table")},
                "event_timestamp": sa.func.coalesce(excluded.event_timestamp, t.event_timestamp),
                # The load this verdict is about (a mark that does not know it keeps the earlier one).
                "row_loaded_at": sa.func.coalesce(excluded.row_loaded_at, t.row_loaded_at),
            }
        self._write(values, rows["key"], update, where=t.status != DELIVERED)

    def _write(self, values: Mapping[str, sa.ColumnElement], key: sa.ColumnElement,
               update: Callable[[sa.ColumnCollection], dict], where: sa.ColumnElement[bool] | None = None,
               insert_first: bool = False) -> None:
        """The one statement every mark is: ``INSERT INTO deliveries SELECT <values> FROM <rows>
        ON CONFLICT (destination, idempotency_key) DO UPDATE SET <update(excluded)> [WHERE <where>]``.

        Rows are taken in key order, one lock order for every writer: concurrent marks cannot
        deadlock. (``WHERE true`` because SQLite cannot otherwise tell ``ON CONFLICT`` from a join.)"""
        rows = sa.select(*values.values()).where(sa.true()).order_by(key)
        insert = (sqlite.insert if self._sqlite else postgresql.insert)(self.table).from_select(list(values), rows)
        upsert = insert.on_conflict_do_update(index_elements=[self.table.c.destination, self.table.c.idempotency_key],
                                              set_=update(insert.excluded), where=where)
        if insert_first:
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert)
                return
            except sa.exc.IntegrityError:
                pass
        with self.engine.begin() as conn:
            conn.execute(upsert)

    def _rows(self, columns: Mapping[str, tuple[Sequence | str, _SqlType]]) -> dict[str, sa.ColumnElement]:
        """The columns of a batch of rows, as a table-valued function the mark selects from.

        PostgreSQL: ``unnest()`` of one array per column, each bound as one array literal
        (psycopg2 would otherwise inline every element into the SQL text, which PostgreSQL then
        has to parse). SQLite: ``json_each()`` of one JSON list of rows."""
        names = list(columns)
        if self._sqlite:
            document = json.dumps(list(zip(*(values for values, _ in columns.values()), strict=True)))
            rows = sa.func.json_each(sa.bindparam("rows", document, type_=sa.Text)).table_valued("value")
            return {name: sa.func.json_extract(rows.c.value, f"$[{i}]") for i, name in enumerate(names)}
        arrays = [sa.cast(sa.bindparam(f"rows_{name}", values if isinstance(values, str) else _array_literal(values),
                                       type_=sa.Text), postgresql.ARRAY(type_))
                  for name, (values, type_) in columns.items()]
        unnest = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="u")
        return {name: unnest.c[name] for name in names}

    def _stamps(self, values: Sequence[datetime | None] | np.ndarray) -> tuple[Sequence | str, _SqlType]:
        """Event timestamps for one statement, formatted by numpy rather than per event in Python:
        microseconds since the epoch as a ``bigint[]`` literal on PostgreSQL, SQLite's text format
        (the one SQLAlchemy writes, so typed queries compare correctly) otherwise."""
        import numpy as np  # here: a task that only reads or refreshes statistics imports no numpy or pandas

        from usage_billing.destinations.base import timestamp_array

        stamps = timestamp_array(values)
        missing = np.isnat(stamps)
        if self._sqlite:
            text = np.char.replace(np.datetime_as_string(stamps, unit="us"), "T", " ").astype(object)
            text[missing] = None
            return text.tolist(), sa.Text
        micros = stamps.astype(np.int64).astype(str)
        micros[missing] = "NULL"
        return "{" + ",".join(micros.tolist()) + "}", sa.BigInteger

    def _stamp_column(self, stamp: sa.ColumnElement) -> sa.ColumnElement:
        if self._sqlite:
            return stamp
        return sa.literal(_EPOCH, sa.DateTime(timezone=True)) + stamp * sa.literal(timedelta(microseconds=1))

    def _bind_time(self, value: datetime) -> sa.ColumnElement:
        # SQLite keeps the wall-clock text of what it is given: make it UTC, as every other value.
        return sa.literal(value.astimezone(UTC) if self._sqlite else value, sa.DateTime(timezone=True))

    def _archive(self, destination: str, keys: Sequence[str], run: RunRef, now: datetime) -> None:
        """Copy the current delivery of these keys into delivery_history before they are re-sent."""
        t, h = self.table.c, self.history.c
        earlier = sa.select(t.destination, t.idempotency_key, t.status, t.reason, t.delivered_at, t.backfill_id, t.mode,
                            t.run_id, self._bind_time(now), sa.literal(run.run_id)).where(
            t.destination == destination, t.status == DELIVERED, self._among(t.idempotency_key, keys))
        with self.engine.begin() as conn:
            conn.execute(self.history.insert().from_select(
                [h.destination, h.idempotency_key, h.status, h.reason, h.delivered_at, h.backfill_id, h.mode, h.run_id,
                 h.superseded_at, h.superseded_by_run], earlier))

    # -- reading ---------------------------------------------------------------------------------

    def history_of(self, destination: str, key: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.history).where(
                self.history.c.destination == destination, self.history.c.idempotency_key == key)
                .order_by(self.history.c.id))
            return [dict(row._mapping) for row in rows]

    def counts(self, destination: str | None = None) -> dict[str, dict[str, int]]:
        """``{destination: {status: count}}``."""
        t = self.table.c
        query = sa.select(t.destination, t.status, sa.func.count()).group_by(t.destination, t.status)
        if destination:
            query = query.where(t.destination == destination)
        result: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for dest, status, count in conn.execute(query):
                result.setdefault(dest, {})[status] = count
        return result

    def rejected_reasons(self, destination: str, limit: int = 20) -> list[tuple[str, int]]:
        """Rejection reasons with their counts, most frequent first (row ids stripped for grouping)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.table.c.reason).where(self._rejected(destination)))
            counter = Counter(generic_reason(reason) for (reason,) in rows)
        return counter.most_common(limit)

    def rejected(self, destination: str, reason_contains: str | None = None,
                 limit: int | None = None) -> list[dict]:
        """Rejected events (key, message id, table, timestamp, reason, attempts, the row's loaded-at
        when rejected), oldest first."""
        t = self.table.c
        query = (sa.select(t.idempotency_key, t.message_id, t.event_table, t.event_timestamp, t.reason, t.attempts,
                           t.last_attempt_at, t.row_loaded_at)
                 .where(self._rejected(destination, reason_contains))
                 .order_by(t.event_timestamp, t.idempotency_key).limit(limit or None))
        with self.engine.connect() as conn:
            return [{**row._mapping, "row_loaded_at": _aware(row.row_loaded_at)} for row in conn.execute(query)]

    def _rejected(self, destination: str, reason_contains: str | None = None) -> sa.ColumnElement[bool]:
        """"This destination's rejected events", optionally by reason text."""
        t = self.table.c
        clause = sa.and_(t.destination == destination, t.status == REJECTED)
        if reason_contains:
            clause = sa.and_(clause, t.reason.like(f"%{reason_contains}%"))
        return clause

    def held_due(self, destination: str, table: str, until: datetime, run: RunRef | None = None) -> list[dict]:
        """A table's held events whose timestamp is now acceptable (at or before ``until``), as
        ``message_id`` and ``row_loaded_at`` (the row's loaded-at when held), oldest first, leaving
        out those ``run`` itself just held (it looks again next run)."""
        t = self.table.c
        query = (sa.select(t.message_id, t.row_loaded_at)
                 .where(t.destination == destination, t.status == HELD, t.event_table == table,
                        t.event_timestamp <= until, t.message_id.is_not(None))
                 .order_by(t.event_timestamp))
        if run is not None:
            query = query.where(sa.or_(t.run_id.is_(None), t.run_id != run.run_id, t.dag_id != run.dag_id))
        with self.engine.connect() as conn:
            return [{"message_id": message_id, "row_loaded_at": _aware(loaded)}
                    for message_id, loaded in conn.execute(query)]

    def queued(self, destination: str, start: datetime | None = None, end: datetime | None = None,
               run: RunRef | None = None) -> list[dict]:
        """The events queued for a backfill (key, message id, table, timestamp, the row's loaded-at
        when queued), oldest first; with ``start``/``end`` only those whose timestamp lies in
        ``[start, end)``, with ``run`` only those that run queued."""
        t = self.table.c
        query = (sa.select(t.idempotency_key, t.message_id, t.event_table, t.event_timestamp, t.row_loaded_at)
                 .where(t.destination == destination, t.status == QUEUED).order_by(t.event_timestamp))
        if run is not None:
            query = query.where(t.dag_id == run.dag_id, t.run_id == run.run_id)
        if start is not None:
            query = query.where(t.event_timestamp >= self._utc(start))
        if end is not None:
            query = query.where(t.event_timestamp < self._utc(end))
        with self.engine.connect() as conn:
            return [{**row._mapping, "event_timestamp": _aware(row.event_timestamp),
                     "row_loaded_at": _aware(row.row_loaded_at)} for row in conn.execute(query)]

    def delivered_between(self, destination: str, start: datetime, end: datetime) -> int:
        """Delivered events whose event timestamp lies in ``[start, end)``."""
        t = self.table.c
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(
                t.destination == destination, t.status == DELIVERED, t.event_timestamp >= start,
                t.event_timestamp < end)).scalar_one())

    def rejected_tables(self, destination: str, reason_contains: str | None = None) -> list[str]:
        """Event tables that hold rejected events of a destination."""
        t = self.table.c
        query = sa.select(t.event_table).distinct().where(self._rejected(destination, reason_contains),
                                                           t.event_table.is_not(None), t.event_table != "")
        with self.engine.connect() as conn:
            return sorted(conn.execute(query).scalars())

    # -- reconciliation (usage_billing.reconcile) ------------------------------------------------

    def delivered_per_hour(self, destination: str, start: datetime, end: datetime) -> dict[datetime, int]:
        """Delivered events per UTC hour of their event timestamp, for ``[start, end)``.

        One scan of the destination's delivered rows in the range: there is no index on the event
        timestamp, because every mark would pay for it and only this daily query reads it."""
        t = self.table.c
        if self._sqlite:  # stored as UTC text 'YYYY-MM-DD HH:MM:SS...'
            hour = sa.func.substr(t.event_timestamp, 1, 13)
        else:
            hour = sa.func.to_char(sa.func.timezone("UTC", t.event_timestamp), "YYYY-MM-DD HH24")
        query = (sa.select(hour, sa.func.count()).where(
            t.destination == destination, t.status == DELIVERED, t.event_timestamp >= self._utc(start),
            t.event_timestamp < self._utc(end)).group_by(hour))
        with self.engine.connect() as conn:
            return {datetime.strptime(text, "%Y-%m-%d %H").replace(tzinfo=UTC): int(count)
                    for text, count in conn.execute(query)}

    def delivered_keys_in(self, destination: str, hours: Sequence[datetime]) -> dict[datetime, list[str]]:
        """The keys of the delivered events of each of ``hours`` (UTC hour starts), in one query."""
        if not hours:
            return {}
        t = self.table.c
        ranges = [sa.and_(t.event_timestamp >= self._utc(h), t.event_timestamp < self._utc(h + timedelta(hours=1)))
                  for h in hours]
        query = sa.select(t.idempotency_key, t.event_timestamp).where(
            t.destination == destination, t.status == DELIVERED, sa.or_(*ranges))
        found: dict[datetime, list[str]] = {hour: [] for hour in hours}
        with self.engine.connect() as conn:
            for key, stamp in conn.execute(query):
                stamp = _parse_time(stamp)
                stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
                found[stamp.astimezone(UTC).replace(minute=0, second=0, microsecond=0)].append(key)
        return found

    def mark_lost(self, destination: str, keys: Sequence[str], run: RunRef, now: datetime,
                  reason: str) -> list[dict]:
        """Mark delivered events the destination turned out not to hold as ``lost``, so the next
        delivery of their ids sends them again under the same keys; their delivery so far is kept
        in ``delivery_history``. Returns the rows marked (key, message id, table, timestamp, and the
        row's loaded-at when the event was once rejected, held or queued; a delivery does not record it)."""
        if not keys:
            return []
        t = self.table.c
        self._archive(destination, keys, run, now)
        where = sa.and_(t.destination == destination, t.status == DELIVERED, self._among(t.idempotency_key, keys))
        with self.engine.begin() as conn:
            rows = [{**row._mapping, "row_loaded_at": _aware(row.row_loaded_at)} for row in conn.execute(
                sa.select(t.idempotency_key, t.message_id, t.event_table, t.event_timestamp, t.row_loaded_at)
                .where(where))]
            conn.execute(self.table.update().where(where).values(
                status=LOST, reason=reason[:MAX_REASON], last_attempt_at=self._bind_time(now),
                dag_id=run.dag_id, run_id=run.run_id))
        return rows

    def record_findings(self, destination: str, findings: Sequence[Mapping[str, object]], run: RunRef,
                        now: datetime) -> None:
        """Add findings (``kind``, ``hour``, optional ``idempotency_key``, ``events``, ``detail``)."""
        if not findings:
            return
        rows = [{"destination": destination, "kind": f["kind"], "hour": self._utc(f["hour"]),  # type: ignore[arg-type]
                 "idempotency_key": f.get("idempotency_key"), "events": f.get("events", 1),
                 "detail": str(f.get("detail") or "")[:MAX_REASON], "found_at": self._utc(now),
                 "dag_id": run.dag_id, "run_id": run.run_id} for f in findings]
        with self.engine.begin() as conn:
            conn.execute(self.findings_table.insert(), rows)

    def heal_findings(self, destination: str, kind: str, keys: Sequence[str], run: RunRef, now: datetime) -> None:
        """Mark the open findings of ``kind`` for these keys healed."""
        if not keys:
            return
        f = self.findings_table.c
        with self.engine.begin() as conn:
            conn.execute(self.findings_table.update().where(
                f.destination == destination, f.kind == kind, f.healed_at.is_(None),
                self._among(f.idempotency_key, keys)).values(healed_at=self._utc(now), healed_by_run=run.run_id))

    def findings(self, destination: str | None = None) -> list[dict]:
        """Every finding of ``destination`` (None: of every destination), oldest first."""
        f = self.findings_table.c
        query = sa.select(self.findings_table).order_by(f.id)
        if destination is not None:
            query = query.where(f.destination == destination)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # -- the sweep's day counts (usage_billing.delivery.sweep) ------------------------------------

    def record_day_counts(self, destination: str, days: Mapping[date, Mapping[str, int]], run: RunRef,
                          now: datetime) -> None:
        """Store what the sweep counted for each event day (``warehouse``, ``delivered``, ``rejected``,
        ``held``), replacing the day's earlier count: a day's row is always its latest count."""
        if not days:
            return
        table = self.day_counts_table
        rows = [{"destination": destination, "day": day, **{name: int(counts[name]) for name in DAY_COUNTS},
                 "counted_at": self._utc(now), "dag_id": run.dag_id, "run_id": run.run_id}
                for day, counts in sorted(days.items())]
        insert = (sqlite.insert if self._sqlite else postgresql.insert)(table).values(rows)
        with self.engine.begin() as conn:
            conn.execute(insert.on_conflict_do_update(
                index_elements=[table.c.destination, table.c.day],
                set_={name: insert.excluded[name] for name in (*DAY_COUNTS, "counted_at", "dag_id", "run_id")}))

    def day_counts(self) -> list[dict]:
        """Every destination's stored day counts: the sweep's latest count of each event day."""
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.select(self.day_counts_table))]

    # -- the Billing view (billing_airflow.ui.billing_view) ----------------------------------------
    # Read only, every destination at once, and never the warehouse: a page view must not start a
    # scan of a warehouse that bills by the byte.

    def has_table(self, name: str) -> bool:
        """Whether the ledger has table ``name`` (``deliveries``, ``day_counts``...) yet: the view may be
        opened before the first task created the ledger, or against a ledger older than the table."""
        return sa.inspect(self.engine).has_table(name, schema=self.schema)

    def counts_per_day(self) -> list[dict]:
        """Events per day of their own timestamp, destination and status, and whether sent through a
        backfill: ``day``, ``destination``, ``status``, ``backfill``, ``n``. ``day`` is a date on
        PostgreSQL and text on SQLite."""
        t = self.table.c
        day = sa.func.date(t.event_timestamp)
        via_backfill = t.backfill_id.is_not(None)
        query = (sa.select(day.label("day"), t.destination, t.status, via_backfill.label("backfill"),
                           sa.func.count().label("n"))
                 .group_by(day, t.destination, t.status, via_backfill))
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def rejected_and_held(self) -> list[dict]:
        """Every rejected or held event (``destination``, ``status``, ``reason``, ``message_id``,
        ``event_table``, ``event_timestamp``, ``attempts``, ``customer_id``), per destination oldest first."""
        t = self.table.c
        query = (sa.select(t.destination, t.status, t.reason, t.message_id, t.event_table, t.event_timestamp,
                           t.attempts, t.customer_id)
                 .where(t.status.in_((REJECTED, HELD))).order_by(t.destination, t.event_timestamp, t.idempotency_key))
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def delivered_per_customer(self, customer: str | None = None) -> list[dict]:
        """Per destination and known billing customer (only ``customer`` if given): the delivered events
        (``n``) and the latest delivery (``last``)."""
        t = self.table.c
        query = (sa.select(t.destination, t.customer_id, sa.func.count().label("n"),
                           sa.func.max(t.delivered_at).label("last"))
                 .where(*self._delivered_to_customer(customer)).group_by(t.destination, t.customer_id))
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def delivered_event_names(self, customer: str | None = None) -> list[dict]:
        """Per destination, known billing customer (only ``customer`` if given) and event name: the
        delivered events (``n``)."""
        t = self.table.c
        query = (sa.select(t.destination, t.customer_id, t.event_name, sa.func.count().label("n"))
                 .where(*self._delivered_to_customer(customer)).group_by(t.destination, t.customer_id, t.event_name))
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def _delivered_to_customer(self, customer: str | None) -> list[sa.ColumnElement[bool]]:
        t = self.table.c
        return [t.status == DELIVERED, t.customer_id.is_not(None), *([t.customer_id == customer] if customer else [])]

    def _utc(self, value: datetime) -> datetime:
        # SQLite stores the wall-clock text it is given: every value goes in as UTC.
        return value.astimezone(UTC) if self._sqlite else value


def unchanged_since(rejected_at: datetime | None, loaded_at: datetime | None) -> bool:
    """Whether a row loaded at ``loaded_at`` is the one rejected at load ``rejected_at`` (not loaded
    again since). Unknown either side: not known to be the same, so it is tried again."""
    return rejected_at is not None and loaded_at is not None and rejected_at >= loaded_at


def _array_literal(values: Sequence[object]) -> str:
    """A PostgreSQL array literal for ``CAST(:x AS text[])``: one bound string, however many values."""
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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:80]


def _parse_time(value: object) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _item(value: object) -> object:
    """A ``datetime64`` as a naive UTC datetime (None for NaT); anything else unchanged."""
    if hasattr(value, "dtype"):
        return value.astype("datetime64[us]").item()
    return value


def _aware(value: object) -> datetime | None:
    """A timestamp read back from the ledger, as an aware UTC datetime (SQLite returns naive text)."""
    stamp = _parse_time(value)
    return None if stamp is None else (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).astimezone(UTC)


def generic_reason(reason: str | None) -> str:
    """'api_call row id=ajs-1: no external customer ID ...' -> 'no external customer ID ...'."""
    if not reason:
        return "(no reason)"
    head, sep, tail = reason.partition(": ")
    return tail if sep and " row id=" in head else reason
