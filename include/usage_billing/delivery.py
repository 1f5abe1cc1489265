"""The one delivery core every destination shares: extract -> map -> ledger filter -> send -> mark.

For one partition of one window (an event table, optionally one hash bucket of it) and one
destination, :func:`deliver_partition`:

1. reads the window's rows in bounded chunks, one row per ``id`` (:mod:`usage_billing.warehouse`);
2. maps each chunk with the destination's pure mapping; rows that cannot make an event are
   recorded as rejected with their reason;
3. leaves out the events the ledger has as delivered: inside the extraction query when the ledger
   shares the warehouse's database, else with one ledger lookup per chunk, before any batch is built
   (overlapping runs are serialised per partition by a lock in the ledger database);
4. sends the rest in batches of at most ``batch_size``, ``concurrency`` requests at a time,
   through a :class:`Sender` (the destination's hook: auth, pacing, retries);
5. marks each event delivered once the destination confirmed it, or rejected with the
   destination's message. A batch the destination refuses as a whole without naming the bad events
   is bisected until they are isolated, so good events in it are still delivered.

The steps overlap: a thread reads the next chunk and another maps it while the task's thread
sends this one, and two writer threads record confirmations in the ledger (bounded queues between
them, so memory does not grow with the window). ``make bench`` measures the result.

What is retried (inside the Sender): 429, 5xx, timeouts, dropped connections, with capped
exponential backoff and jitter, honouring ``Retry-After``. What is terminal: a 4xx for one event
(rejected, replayable), or a 401/403/404 (the whole task fails: a configuration problem). When the
retries run out, the confirmed part is marked, and :class:`DeliveryFailed`
fails the task so Airflow's next try sends the rest. Nothing is marked delivered that the
destination did not confirm.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from usage_billing.backfills import backfill_session, group_by_day, timeframe_for
from usage_billing.destinations import Destination
from usage_billing.destinations.base import Mapped, Rejection
from usage_billing.ledger import EventRefs, Ledger, Route, RunRef
from usage_billing.warehouse import COPIES, Partition, Window, count_events, read_events, table_columns

log = logging.getLogger(__name__)

# Ledger writes are coalesced up to this many keys and run in writer threads with at most three
# writes waiting: a crash can leave at most about five times this many confirmed-but-unmarked events,
# which the next attempt re-sends (and the destination de-duplicates by idempotency key).
MARK_EVERY = 5_000


class BatchRejected(Exception):
    """The destination refused the whole request (4xx) without saying which events are bad."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class TransientDeliveryError(Exception):
    """Retries ran out on a retryable failure: the batch's outcome is unknown or negative."""


class FatalDeliveryError(Exception):
    """A failure no retry or bisection can fix (bad credentials, wrong URL)."""


class DeliveryFailed(Exception):
    """Raised after marking what was confirmed, so the task fails and its next try sends the rest."""


@dataclass
class BatchOutcome:
    """What the destination said about one request's events."""

    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    requests: int = 1
    bisections: int = 0

    def merge(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(self.accepted + other.accepted, {**self.rejected, **other.rejected},
                            self.retries + other.retries, self.requests + other.requests,
                            self.bisections + other.bisections)


class Sender(Protocol):
    """Transport for one destination (implemented by the destination's Airflow hook)."""

    def send(self, events: list[dict], keys: list[str], backfill_id: str | None = None) -> BatchOutcome:
        """POST one batch (inside a backfill when ``backfill_id`` is given); retry transient
        failures; raise BatchRejected / TransientDeliveryError / FatalDeliveryError as documented."""


@dataclass
class DeliveryReport:
    """Counts for one task: what it extracted, skipped, sent and rejected, and why."""

    destination: str
    partition: str
    window: str
    rows_read: int = 0
    duplicates_dropped: int = 0
    unique_events: int = 0
    mapping_rejected: int = 0
    already_delivered: int = 0
    sent: int = 0
    accepted: int = 0
    destination_rejected: int = 0
    sent_in_backfills: int = 0
    backfills: int = 0
    old_events: int = 0
    batches: int = 0
    requests: int = 0
    retries: int = 0
    bisections: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    lateness_seconds: list[float] = field(default_factory=list, repr=False)
    stages: Counter = field(default_factory=Counter)

    _stage_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``stages[stage]`` (extract, transform, ledger_filter,
        deliver, ledger_write). Stages run in their own threads at once (reading, mapping, sending,
        ledger writing), so their times add up to more than the task's duration."""
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._stage_lock:
                self.stages[stage] += time.perf_counter() - started

    @property
    def rejected(self) -> int:
        return self.mapping_rejected + self.destination_rejected

    @classmethod
    def combine(cls, reports: Sequence[DeliveryReport], destination: str, partition: str,
                window: str) -> DeliveryReport:
        """One report adding up several (the batches of a replay)."""
        total = cls(destination=destination, partition=partition, window=window)
        for report in reports:
            for name, value in report.__dict__.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    setattr(total, name, getattr(total, name) + value)
            total.reasons.update(report.reasons)
            total.stages.update(report.stages)
            total.notes.extend(report.notes)
            total.lateness_seconds.extend(report.lateness_seconds)
        return total

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items()
                if k not in ("reasons", "lateness_seconds", "stages", "_stage_lock")}
        data["stages"] = {stage: round(seconds, 3) for stage, seconds in self.stages.items()}
        data["top_reasons"] = self.reasons.most_common(5)
        data["lateness"] = lateness_summary(self.lateness_seconds)
        return data

    def render(self) -> str:
        """The summary block a data engineer reads in the task log."""
        rate = self.sent / self.seconds if self.seconds else 0.0
        lines = [
            f"usage_billing summary: destination={self.destination} partition={self.partition}",
            f"  window            {self.window}",
            f"  extracted         {self.rows_read} rows read, {self.duplicates_dropped} duplicate rows dropped, "
            f"{self.unique_events} unique events",
            f"  skipped           {self.already_delivered} already delivered",
            f"  sent              {self.sent} events in {self.batches} batches ({self.requests} requests, "
            f"{self.retries} retries, {self.bisections} bisections)",
            f"  accepted          {self.accepted}"
            + (f" ({self.sent_in_backfills} sent inside {self.backfills} Orb backfills: older than the grace period)"
               if self.backfills else ""),
            f"  rejected          {self.rejected} ({self.mapping_rejected} by the mapping, "
            f"{self.destination_rejected} by {self.destination})",
        ]
        for reason, count in self.reasons.most_common(5):
            lines.append(f"    {count:>8} x {reason}")
        late = lateness_summary(self.lateness_seconds)
        if late:
            lines.append(f"  lateness          loaded after event time: median {late['median']}, "
                         f"p99 {late['p99']}, max {late['max']}")
        lines.append(f"  duration          {self.seconds:.1f} s, {rate:.0f} events/s sent")
        if self.stages:
            lines.append("  stages (overlap)  " + ", ".join(f"{stage} {seconds:.1f}s"
                                                          for stage, seconds in self.stages.items()))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def lateness_summary(seconds: Sequence[float]) -> dict[str, str]:
    if not len(seconds):
        return {}
    values = np.asarray(seconds, dtype=float)
    def fmt(x: float) -> str:
        return f"{x / 3600:.1f}h" if x >= 3600 else f"{x / 60:.1f}m" if x >= 60 else f"{x:.0f}s"
    return {"median": fmt(float(np.median(values))), "p99": fmt(float(np.percentile(values, 99))),
            "max": fmt(float(values.max()))}


def _generic(reason: str) -> str:
    head, sep, tail = reason.partition(": ")
    return tail if sep and " row id=" in head else reason


def _dedupe_keys(mapped: Mapped) -> list[Rejection]:
    """Keep the first event per idempotency key; a second row with the same key is rejected.

    Orb refuses a whole batch holding one key twice with different bodies, and the ledger is keyed
    on it, so a key collision (a custom idempotency_key_field that is not unique) must stop here.
    """
    seen: dict[str, int] = {}
    drop: list[int] = []
    for position, key in enumerate(mapped.keys):
        if key in seen:
            drop.append(position)
        else:
            seen[key] = position
    rejections = [
        Rejection(key=f"{mapped.keys[p]}#dup:{mapped.message_ids[p]}", message_id=mapped.message_ids[p],
                  table=mapped.tables[p], event_timestamp=mapped.timestamp(p),
                  reason=f"{mapped.tables[p]} row id={mapped.message_ids[p]}: idempotency key {mapped.keys[p]!r} "
                         f"is also the key of row id={mapped.message_ids[seen[mapped.keys[p]]]}; keys must be unique")
        for p in drop]
    if drop:
        mapped.drop(drop)
    return rejections


def send_resolving(sender: Sender, events: list[dict], keys: list[str],
                   backfill_id: str | None = None) -> BatchOutcome:
    """Send a batch; if the destination refuses it whole, bisect until the bad events are isolated."""
    try:
        return sender.send(events, keys, backfill_id) if backfill_id else sender.send(events, keys)
    except BatchRejected as error:
        if len(events) == 1:
            return BatchOutcome(rejected={keys[0]: error.message})
        middle = len(events) // 2
        left = send_resolving(sender, events[:middle], keys[:middle], backfill_id)
        right = send_resolving(sender, events[middle:], keys[middle:], backfill_id)
        outcome = left.merge(right)
        outcome.bisections += 1
        return outcome


@dataclass
class _Pending:
    keys: list[str]
    future: Future


def deliver_partition(
    *,
    engine: Engine,
    schema: str,
    partition: Partition,
    window: Window | None,
    loaded_at_column: str,
    chunk_size: int,
    destination: Destination,
    sender: Sender,
    ledger: Ledger,
    run: RunRef,
    concurrency: int,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    replace_backfill_id: str | None = None,
    ids: Sequence[str] | None = None,
    retry_rejected: bool = True,
) -> DeliveryReport:
    """Deliver one partition of one window to one destination; see the module docstring.

    With ``ids`` instead of a window, the rows with those Segment message ids are (re)delivered
    whatever their load time: the replay of rejected events. With ``replace_backfill_id`` every
    event read is re-sent into that (replacing) Orb backfill, delivered or not: replace mode.
    ``retry_rejected=False`` leaves rejected events alone (the completeness sweep).
    """
    started = time.monotonic()
    label = str(window) if ids is None else f"replay of {len(ids)} rejected events"
    report = DeliveryReport(destination=destination.name, partition=str(partition), window=label)
    same_database = ledger.engine is engine
    try:
        # Overlapping runs of this partition take turns, so each sees what the other delivered.
        with ledger.lock(f"{destination.name}:{partition}"), engine.connect() as conn:
            columns = table_columns(conn, schema, partition.table)
            if columns is None:
                report.notes.append(f"event table {schema}.{partition.table} does not exist yet "
                                    f"(source.events lists it); nothing to read")
                return report
            if loaded_at_column not in columns:
                raise ValueError(f"source.loaded_at_column: column {loaded_at_column!r} does not exist "
                                 f"in {schema}.{partition.table}")
            wanted = [*destination.required_columns(columns), loaded_at_column]
            for missing in destination.missing_fields(columns):
                report.notes.append(f"{missing} is not a column of {schema}.{partition.table}: treated as absent")
            filtered = same_database and replace_backfill_id is None and destination.key_column in columns
            if filtered:
                with report.timed("ledger_filter"):
                    ledger.refresh_statistics()  # the filter's plan depends on them
            chunks = read_events(conn, schema, partition, window, loaded_at_column, wanted, chunk_size, ids,
                                 where=None if not filtered else lambda table: ~ledger.known_clause(
                                     destination.name, table.c[destination.key_column], retry_rejected))
            # Reading, mapping and sending each run in their own thread, one chunk apart; both
            # readers are closed before the connection is (which cancels an unfinished COPY).
            read = _read_ahead(_timed_iter(chunks, report, "extract"), f"{destination.name}-read")
            ready = _read_ahead((_prepare_chunk(chunk, loaded_at_column, destination, report, now) for chunk in read),
                                f"{destination.name}-map")
            with contextlib.closing(read), contextlib.closing(ready), \
                    ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=destination.name) as pool, \
                    _LedgerWriter(ledger, destination.name, run, report, now) as writer:
                # The events the filter leaves in the database are the window's events it did
                # not read: counted on another connection while the read starts.
                window_events = None if not filtered else pool.submit(
                    _count_window_events, engine, report, schema, partition, window, loaded_at_column, ids)
                for mapped, rejections in ready:
                    _deliver_chunk(mapped, rejections, destination, sender, ledger, writer, pool, concurrency,
                                   report, now, replace_backfill_id, retry_rejected, filtered=filtered)
                if window_events is not None:
                    # max(): rows loaded into the window between the count and the read
                    report.already_delivered += max(0, window_events.result() - report.unique_events)
                    report.unique_events = max(window_events.result(), report.unique_events)
    finally:
        report.seconds = time.monotonic() - started
    if report.old_events:
        report.notes.append(f"{report.old_events} events are older than {destination.old_event_warning}: "
                            f"{destination.name} may already have invoiced their period (sent with their true "
                            f"timestamps)")
        log.warning("%s: %d events older than %s", destination.name, report.old_events,
                    destination.old_event_warning)
    if ids is not None and report.unique_events < len(set(ids)):
        report.notes.append(f"{len(set(ids)) - report.unique_events} rejected events are no longer in "
                            f"{schema}.{partition.table}")
    return report


def _count_window_events(engine: Engine, report: DeliveryReport, *arguments) -> int:
    with report.timed("ledger_filter"), engine.connect() as conn:
        return count_events(conn, *arguments)


def replay_rejected(*, ledger: Ledger, destination: Destination, table: str, reason_contains: str | None = None,
                    batch: int = 10_000, **deliver_arguments) -> DeliveryReport:
    """Re-send the rejected events of one event table, read again from the warehouse and mapped
    with the current settings, under their original idempotency keys.

    Use it after fixing the mapping or the data; events still invalid are rejected again with the
    current reason. ``reason_contains`` narrows the replay to one kind of rejection.
    """
    rows = [r for r in ledger.rejected(destination.name, reason_contains) if r["event_table"] == table]
    message_ids = list(dict.fromkeys(r["message_id"] for r in rows if r["message_id"]))
    reports = [deliver_partition(partition=Partition(table), window=None, destination=destination, ledger=ledger,
                                 ids=message_ids[start:start + batch], **deliver_arguments)
               for start in range(0, len(message_ids), batch)]
    return DeliveryReport.combine(reports, destination.name, table,
                                  f"replay of {len(message_ids)} rejected events"
                                  + (f" whose reason contains {reason_contains!r}" if reason_contains else ""))


def _timed_iter(items: Iterator, report: DeliveryReport, stage: str) -> Iterator:
    """Yield from ``items``, adding the time spent producing each item to ``stage``."""
    try:
        while True:
            with report.timed(stage):
                item = next(items, None)
            if item is None:
                return
            yield item
    finally:
        _close(items)


def _close(items: Iterator) -> None:
    """Close a generator now (its ``finally`` blocks run: a COPY is cancelled), not when collected."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


_DONE = object()


def _read_ahead(items: Iterator, name: str, depth: int = 1) -> Iterator:
    """Yield ``items``, producing up to ``depth`` of them ahead in a background thread.

    The database and the CPU-bound mapping of the next chunk then overlap the sending of this one;
    ``depth`` bounds the chunks held in memory. An error in the producer is raised here; closing
    this generator early stops the producer, which closes ``items``.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((_DONE, None))
        except BaseException as error:  # handed to the consumer, which raises it
            ready.put((_DONE, error))
        finally:
            _close(items)

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while producer.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        producer.join()


def _prepare_chunk(chunk: pd.DataFrame, loaded_at_column: str, destination: Destination, report: DeliveryReport,
                   now: Callable[[], datetime]) -> tuple[Mapped, list[Rejection]]:
    """Count a chunk's rows and map it (runs in the read-ahead thread)."""
    report.rows_read += int(chunk[COPIES].sum())
    report.duplicates_dropped += int((chunk[COPIES] - 1).sum())
    report.unique_events += len(chunk)
    late = (chunk[loaded_at_column] - chunk["timestamp"]).dt.total_seconds().dropna()
    if len(late):
        report.lateness_seconds.extend(late.sample(min(len(late), 2_000), random_state=0).tolist())
    if destination.old_event_warning is not None:
        report.old_events += int((chunk["timestamp"] < pd.Timestamp(now() - destination.old_event_warning)).sum())
    with report.timed("transform"):
        mapped = destination.map_events(chunk, now())
        return mapped, [*mapped.rejected, *_dedupe_keys(mapped)]


class _LedgerWriter:
    """Ledger writes in two background threads (two database sessions).

    The senders keep sending while PostgreSQL records the previous confirmations; a write is one
    statement of up to MARK_EVERY keys, and two run at once because one session alone cannot keep up
    with the senders. Writes touch disjoint keys (an event is either confirmed or rejected once per
    run), so their order does not matter. At most ``depth`` writes wait; a write that fails is
    raised in the delivering thread at its next submission or at :meth:`flush`, and leaving the
    ``with`` block flushes every write.
    """

    def __init__(self, ledger: Ledger, destination: str, run: RunRef, report: DeliveryReport,
                 now: Callable[[], datetime], depth: int = 3):
        self.ledger, self.destination, self.run, self.report, self.now = ledger, destination, run, report, now
        self.depth = depth
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{destination}-ledger")
        self._pending: deque[Future] = deque()

    def __enter__(self) -> _LedgerWriter:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        try:
            if kind is None:
                self.flush()
            else:  # already failing: record what can be recorded, keep the original error
                for future in self._pending:
                    with contextlib.suppress(Exception):
                        future.result()
                self._pending.clear()
        finally:
            self._threads.shutdown(wait=True)

    def _submit(self, write: Callable[[], None]) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()

        def timed() -> None:
            with self.report.timed("ledger_write"):
                write()
        self._pending.append(self._threads.submit(timed))

    def flush(self) -> None:
        """Wait until every submitted write is in the ledger."""
        while self._pending:
            self._pending.popleft().result()

    def delivered(self, mapped: Mapped, positions: list[int], backfill_id: str | None, mode: str) -> None:
        if not positions:
            return
        keys = [mapped.keys[p] for p in positions]
        message_ids = [mapped.message_ids[p] for p in positions]
        tables = [mapped.tables[p] for p in positions]
        events = EventRefs(keys, message_ids, tables, mapped.timestamps[positions])
        self._submit(lambda: self.ledger.mark_delivered(self.destination, self.run, events, self.now(),
                                                        Route(mode, backfill_id)))

    def rejected(self, rejections: list[Rejection]) -> None:
        if rejections:
            self._submit(lambda: self.ledger.mark_rejected(self.destination, self.run, rejections, self.now()))


def _deliver_chunk(mapped: Mapped, rejections: list[Rejection], destination: Destination, sender: Sender,
                   ledger: Ledger, writer: _LedgerWriter, pool: ThreadPoolExecutor, concurrency: int,
                   report: DeliveryReport, now: Callable[[], datetime], replace_backfill_id: str | None,
                   retry_rejected: bool = True, filtered: bool = False) -> None:
    if rejections:
        writer.rejected(rejections)
        report.mapping_rejected += len(rejections)
        report.reasons.update(_generic(r.reason) for r in rejections)

    send = _Sending(mapped, destination, sender, writer, pool, concurrency, report)
    everything = np.arange(len(mapped.keys))
    if replace_backfill_id:
        # Replace mode re-sends every event of the window into one replacing backfill; the ledger
        # keeps the earlier delivery of each event in delivery_history.
        send(everything.tolist(), replace_backfill_id, "replace")
        return

    if filtered:  # the extraction query already left out what the ledger knows
        todo = everything
    else:
        writer.flush()  # this run's own earlier marks count too
        with report.timed("ledger_filter"):
            known = ledger.known_keys(destination.name, mapped.keys, retry_rejected)
        report.already_delivered += len(known)
        todo = np.array([i for i, key in enumerate(mapped.keys) if key not in known], dtype=np.int64)
    cutoff = destination.backfill_cutoff(now())
    if cutoff is None or not hasattr(sender, "open_backfill"):
        send(todo.tolist())
        return
    stamps = mapped.timestamps[todo]
    late = ~np.isnat(stamps) & (stamps < np.datetime64(cutoff.astimezone(UTC).replace(tzinfo=None), "us"))
    send(todo[~late].tolist())
    for day, positions in group_by_day({p: mapped.timestamp(p) for p in todo[late].tolist()}).items():
        start, end = timeframe_for(day, max(mapped.timestamp(p) for p in positions))
        with backfill_session(ledger, sender, destination.name, run=writer.run, start=start, end=end,
                              replace=False) as backfill:
            send(positions, backfill["id"], "backfill")
            writer.flush()  # a closed backfill's events are in the ledger
            report.sent_in_backfills += len(positions)
            report.backfills += 1
            ledger.record_backfill(destination.name, backfill, writer.run, events_sent=len(positions))


class _Sending:
    """Sends chosen events of a mapped chunk, ``concurrency`` requests at a time."""

    def __init__(self, mapped: Mapped, destination: Destination, sender: Sender, writer: _LedgerWriter,
                 pool: ThreadPoolExecutor, concurrency: int, report: DeliveryReport):
        self.mapped, self.destination, self.sender, self.writer = mapped, destination, sender, writer
        self.pool, self.concurrency, self.report = pool, concurrency, report

    def __call__(self, positions: list[int], backfill_id: str | None = None, mode: str = "ingest") -> None:
        if positions:
            with self.report.timed("deliver"):
                _send_positions(self.mapped, positions, self.destination, self.sender, self.writer, self.pool,
                                self.concurrency, self.report, backfill_id, mode)


def _send_positions(mapped: Mapped, positions: list[int], destination: Destination, sender: Sender,
                    writer: _LedgerWriter, pool: ThreadPoolExecutor, concurrency: int, report: DeliveryReport,
                    backfill_id: str | None, mode: str) -> None:
    """Send the events at ``positions`` of a mapped chunk; mark what the destination confirmed."""
    position_of = {mapped.keys[p]: p for p in positions}
    to_mark: list[int] = []
    unconfirmed: list[str] = []
    failure: BaseException | None = None
    in_flight: list[_Pending] = []

    def collect(done: _Pending) -> None:
        nonlocal failure, to_mark
        try:
            outcome = done.future.result()
        except (TransientDeliveryError, FatalDeliveryError) as error:
            unconfirmed.extend(done.keys)
            failure = failure or error
            return
        except Exception as error:  # an unexpected bug must not lose the confirmed part of the chunk
            unconfirmed.extend(done.keys)
            failure = failure or error
            return
        report.requests += outcome.requests
        report.retries += outcome.retries
        report.bisections += outcome.bisections
        report.accepted += len(outcome.accepted)
        to_mark.extend(position_of[k] for k in outcome.accepted if k in position_of)
        if outcome.rejected:
            rejections = [Rejection(key=k, message_id=mapped.message_ids[position_of[k]],
                                    table=mapped.tables[position_of[k]],
                                    event_timestamp=mapped.timestamp(position_of[k]),
                                    reason=f"{destination.name} rejected event {k}: {message}")
                          for k, message in outcome.rejected.items() if k in position_of]
            writer.rejected(rejections)
            report.destination_rejected += len(rejections)
            report.reasons.update(f"{destination.name}: {message}" for message in outcome.rejected.values())
        if len(to_mark) >= MARK_EVERY:
            writer.delivered(mapped, to_mark, backfill_id, mode)
            to_mark = []

    try:
        for start in range(0, len(positions), destination.batch_size):
            batch = positions[start:start + destination.batch_size]
            batch_keys = [mapped.keys[p] for p in batch]
            if failure is None:
                # Bounded in-flight work keeps memory flat and lets a failure stop new sends quickly.
                while len(in_flight) >= concurrency:
                    finished, _ = wait([p.future for p in in_flight], return_when=FIRST_COMPLETED)
                    for pending in [p for p in in_flight if p.future in finished]:
                        in_flight.remove(pending)
                        collect(pending)
            if failure is not None:
                unconfirmed.extend(batch_keys)
                continue
            report.batches += 1
            report.sent += len(batch)
            in_flight.append(_Pending(batch_keys, pool.submit(
                send_resolving, sender, [mapped.payloads[p] for p in batch], batch_keys, backfill_id)))
        for pending in in_flight:
            wait([pending.future])
            collect(pending)
        in_flight.clear()
    finally:
        writer.delivered(mapped, to_mark, backfill_id, mode)
    if failure is not None:
        report.notes.append(f"{len(unconfirmed)} events not confirmed: {failure}")
        raise DeliveryFailed(f"{destination.name}: {len(unconfirmed)} events of partition {report.partition} "
                             f"were not confirmed ({failure}); {report.accepted} were delivered and marked. "
                             f"The next try re-sends the rest with the same idempotency keys.") from failure


def replace_window(*, ledger: Ledger, destination: Destination, sender: Sender, run: RunRef, tables: Sequence[str],
                   window: Window, **deliver_arguments) -> DeliveryReport:
    """Replace mode: re-send every event whose *timestamp* lies in the window into one Orb backfill
    with ``replace_existing_events: true``, so a changed mapping re-bills the period.

    Everything Orb holds in that timeframe, for all customers, is replaced by what this run sends
    when the backfill closes; the ledger keeps each event's earlier delivery in delivery_history.
    Run it for periods whose data is complete: an event loaded later and delivered live into the
    timeframe while the backfill is open would be replaced away.
    """
    if not hasattr(sender, "open_backfill"):
        raise ValueError(f"mode=replace needs backfills, which {destination.name} does not have (Orb only)")
    if window.end - window.start > timedelta(days=31):
        raise ValueError("mode=replace: Orb backfills span at most 31 days; use a shorter window")
    before = ledger.delivered_between(destination.name, window.start, window.end)
    log.warning("REPLACE MODE: every %s event with a timestamp in [%s, %s), for all customers, is replaced by "
                "the events this run sends (the ledger counts %d delivered there now; their earlier deliveries "
                "are kept in %s.delivery_history)", destination.name, window.start.isoformat(),
                window.end.isoformat(), before, ledger.schema)
    by_time = Window(window.start, window.end)
    with backfill_session(ledger, sender, destination.name, run, window.start, window.end, replace=True) as backfill:
        reports = [deliver_partition(partition=Partition(table), window=by_time, loaded_at_column="timestamp",
                                     destination=destination, sender=sender, ledger=ledger, run=run,
                                     replace_backfill_id=backfill["id"], **deliver_arguments) for table in tables]
        ledger.record_backfill(destination.name, backfill, run, events_sent=sum(r.accepted for r in reports))
    report = DeliveryReport.combine(reports, destination.name, ",".join(tables),
                                    f"REPLACE [{window.start:%Y-%m-%d %H:%M}, {window.end:%Y-%m-%d %H:%M}) UTC by "
                                    f"event timestamp, backfill {backfill['id']}")
    report.backfills = 1
    report.sent_in_backfills = report.accepted
    report.notes.append(f"replaced {before} previously delivered events of this timeframe with {report.accepted} "
                        f"events (backfill {backfill['id']}, replace_existing_events=true)")
    log.warning("REPLACE MODE: backfill %s closed; %s now holds %d events for [%s, %s)", backfill["id"],
                destination.name, report.accepted, window.start.isoformat(), window.end.isoformat())
    return report
