"""The entry points: deliver a window, replay rejections, replace a period — each for one job.

For one partition of one window (an event table, optionally one hash bucket of it), :func:`deliver`:

1. reads the window's rows in bounded chunks, one row per ``id``, from the job's source;
2. maps each chunk with the destination's pure mapping; rows that cannot make an event are
   recorded as rejected with their reason;
3. leaves out the events the ledger has as delivered: inside the extraction query when the source
   shares the ledger's database, else with one batched ledger lookup per chunk, before any batch is
   built (overlapping runs of a partition take turns under a lock in the ledger database);
4. sends the rest in batches, ``concurrency`` requests at a time, through the destination's hook;
5. marks each event delivered once the destination confirmed it, or rejected with its message.

Reading, mapping, sending and ledger writing overlap (:mod:`usage_billing.delivery.pipeline`).
What is retried, what is terminal: see :mod:`usage_billing.delivery.contract`. Nothing is marked
delivered that the destination did not confirm.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from usage_billing.delivery.backfills import DAY, backfill_session, day_lock, day_of, open_backfill, timeframe_for
from usage_billing.delivery.job import DeliveryJob, Scope
from usage_billing.delivery.pipeline import LedgerWriter, read_ahead, timed_iter
from usage_billing.delivery.report import DeliveryReport
from usage_billing.delivery.sending import Sending, dedupe_keys
from usage_billing.destinations.base import Mapped, Rejection
from usage_billing.frames import pd
from usage_billing.ledger import QUEUED, REJECTED
from usage_billing.sources import Partition, ReadRequest, Window
from usage_billing.sources.layout import COPIES, LOADED_AT

log = logging.getLogger(__name__)

# A replay reads its rejected events back by message id, this many per query.
REPLAY_BATCH = 10_000
# Taken off the earliest recorded load before it bounds a read by id: the ledger keeps microseconds,
# a warehouse may keep nanoseconds (Snowflake), and the bound must never fall after the row.
LOADED_SINCE_MARGIN = timedelta(seconds=1)
# Orb backfills span at most 31 days (orb-api-notes.md).
MAX_REPLACE = timedelta(days=31)


def deliver_window(job: DeliveryJob, partition: Partition, window: Window) -> DeliveryReport:
    """Deliver one partition of one window (the hourly run, a backfill run, the sweep), then the
    table's held events that are now due (by the table's first partition only, so hash buckets
    do not send them twice)."""
    report = deliver(job, Scope(partition, window=window, label=str(window)))
    destination = job.destination
    holds = destination.future_limit is not None or destination.unknown_customers == "hold"
    if not holds or partition.bucket != 0:
        return report
    limit = destination.future_limit or timedelta(0)
    due = job.ledger.held_due(destination.name, partition.table, (job.now() + limit).astimezone(UTC), job.run)
    if not due:
        return report
    label = f"{len(due)} held events now due"
    held = deliver_ids(job, partition.table, due, label)
    combined = DeliveryReport.combine([report, *held], report)
    combined.notes.append(f"{label}: {sum(r.accepted for r in held)} delivered")
    return combined


def replay_rejected(job: DeliveryJob, table: str, reason_contains: str | None = None) -> DeliveryReport:
    """Re-send the rejected events of one event table, read again from the warehouse and mapped
    with the current settings, under their original idempotency keys.

    Use it after fixing the mapping or the data; events still invalid are rejected again with the
    current reason. ``reason_contains`` narrows the replay to one kind of rejection.
    """
    name = job.destination.name
    rows = [r for r in job.ledger.rejected(name, reason_contains) if r["event_table"] == table and r["message_id"]]
    label = f"replay of {len({r['message_id'] for r in rows})} rejected events" + (
        f" whose reason contains {reason_contains!r}" if reason_contains else "")
    reports = deliver_ids(job, table, rows, label)
    return DeliveryReport.combine(reports, DeliveryReport(name, table, label, mode="replay_rejected"))


def deliver_ids(job: DeliveryJob, table: str, rows: Sequence[Mapping], label: str,
                into_backfill_id: str | None = None) -> list[DeliveryReport]:
    """Deliver chosen rows of one table, read back by message id ``REPLAY_BATCH`` at a time (held
    events now due, a replay, a day's queued events into its backfill, lost events re-sent).

    ``rows`` are the ledger's rows of those events (``message_id``, ``row_loaded_at``): each read
    is pruned on the loaded-at column from the earliest load the ledger recorded for its ids
    (:func:`loaded_since`); without one for every id it reads unpruned and its summary says so."""
    loads: dict[str, list[datetime | None]] = {}
    for row in rows:  # an id may have several keys (rows), each with its own recorded load
        loads.setdefault(row["message_id"], []).append(row.get("row_loaded_at"))
    message_ids = list(loads)
    reports = []
    for start in range(0, len(message_ids), REPLAY_BATCH):
        ids = message_ids[start:start + REPLAY_BATCH]
        since = loaded_since(load for message_id in ids for load in loads[message_id])
        report = deliver(job, Scope(Partition(table), ids=ids, label=label, into_backfill_id=into_backfill_id,
                                    loaded_since=since))
        if since is not None:
            report.notes.append(f"{len(ids)} chosen events read from rows loaded since {since:%Y-%m-%d %H:%M:%S} "
                                f"UTC on {job.loaded_at_column} (the earliest load the ledger recorded for them)")
        else:
            unknown = sum(None in loads[message_id] for message_id in ids)
            report.notes.append(f"{unknown} of {len(ids)} chosen events have no loaded-at in the ledger (recorded "
                                f"before ledger revision 0007, or delivered without a rejection first): read by id "
                                f"with no bound on {job.loaded_at_column}, nothing pruned the scan of "
                                f"{job.source.schema}.{table}")
        reports.append(report)
    return reports


def loaded_since(loads: Iterable[datetime | None]) -> datetime | None:
    """The lower bound on the loaded-at column for reading chosen rows back: the earliest load the
    ledger recorded for them, less :data:`LOADED_SINCE_MARGIN`; None when any is unknown (read them
    unpruned). A row loaded again since has a later loaded-at, so the bound never hides it."""
    earliest = None
    for loaded in loads:
        if loaded is None:
            return None
        earliest = loaded if earliest is None else min(earliest, loaded)
    return None if earliest is None else earliest - LOADED_SINCE_MARGIN


def replace_window(job: DeliveryJob, tables: list[str], window: Window) -> DeliveryReport:
    """Replace mode: re-send every event whose *timestamp* lies in the window into one backfill with
    ``replace_existing_events: true``, so a changed mapping re-bills the period.

    Everything the destination holds in that timeframe, for all customers, is replaced by what this
    run sends when the backfill closes; the ledger keeps each event's earlier delivery in
    delivery_history. Run it for periods whose data is complete: an event loaded later and delivered
    live into the timeframe while the backfill is open would be replaced away.
    """
    destination, ledger = job.destination, job.ledger
    if not destination.capabilities.backfills:
        raise ValueError(f"mode=replace needs backfills, which {destination.name} does not have")
    if window.end - window.start > MAX_REPLACE:
        raise ValueError("mode=replace: backfills span at most 31 days; use a shorter window")
    before = ledger.delivered_between(destination.name, window.start, window.end)
    log.warning("REPLACE MODE: every %s event with a timestamp in [%s, %s), for all customers, is replaced by "
                "the events this run sends (the ledger counts %d delivered there now; their earlier deliveries "
                "are kept in %s.delivery_history)", destination.name, window.start.isoformat(),
                window.end.isoformat(), before, ledger.schema)
    by_time = Window(window.start, window.end)
    with backfill_session(job, window.start, window.end, replace=True) as backfill:
        label = (f"REPLACE [{window.start:%Y-%m-%d %H:%M}, {window.end:%Y-%m-%d %H:%M}) UTC by event timestamp, "
                 f"backfill {backfill['id']}")
        reports = [deliver(job, Scope(Partition(table), window=by_time, replace_backfill_id=backfill["id"],
                                      label=label)) for table in tables]
        ledger.record_backfill(destination.name, backfill, job.run, events_sent=sum(r.accepted for r in reports))
    report = DeliveryReport.combine(reports, DeliveryReport(destination.name, ",".join(tables), label, mode="replace"))
    report.backfills = 1
    report.sent_in_backfills = report.accepted
    report.notes.append(f"replaced {before} previously delivered events of this timeframe with {report.accepted} "
                        f"events (backfill {backfill['id']}, replace_existing_events=true)")
    log.warning("REPLACE MODE: backfill %s closed; %s now holds %d events for [%s, %s)", backfill["id"],
                destination.name, report.accepted, window.start.isoformat(), window.end.isoformat())
    return report


def deliver(job: DeliveryJob, scope: Scope) -> DeliveryReport:
    """Deliver one scope (a partition's window, or chosen ids); see the module docstring."""
    started = job.clock()
    source, destination, ledger = job.source, job.destination, job.ledger
    report = DeliveryReport(destination=destination.name, partition=str(scope.partition),
                            window=scope.label or str(scope.window), mode=scope.mode)
    # Replace mode selects by event time: the events of a billing period, whenever they were loaded.
    loaded_at = "timestamp" if scope.replace_backfill_id else job.loaded_at_column
    table = f"{source.schema}.{scope.partition.table}"
    try:
        # Overlapping runs of this partition take turns, so each sees what the other delivered.
        with ledger.lock(f"{destination.name}:{source.schema}.{scope.partition}"):
            columns = source.table_columns(scope.partition.table)
            if columns is None:
                report.notes.append(f"event table {table} does not exist yet (source.events lists it); "
                                    f"nothing to read")
                return report
            if loaded_at not in columns:
                raise ValueError(f"source.loaded_at_column: column {loaded_at!r} does not exist in {table}")
            report.notes.extend(f"{missing} is not a column of {table}: every row of it is rejected"
                                for missing in destination.missing_fields(columns, required=True))
            filtered = job.ledger_join and not scope.replace_backfill_id and destination.key_column in columns
            unknown = None
            if filtered:
                # The ledger's NOT EXISTS, inside the extraction query. Its plan depends on the ledger's
                # statistics, which the run's report task refreshes after delivering (not here: see
                # Ledger.refresh_statistics).
                def unknown(events):
                    return ~ledger.known_clause(destination.name, events.c[destination.key_column],
                                                job.retry_for(scope), events.c[loaded_at])
            request = ReadRequest(scope.partition, scope.window, [*destination.required_columns(columns), loaded_at],
                                  loaded_at, job.chunk_size, scope.ids, unknown, scope.loaded_since)
            _run(job, scope, request, report, filtered)
    finally:
        report.seconds = job.clock() - started
        report.cost = source.cost.render()
    if report.old_events:
        report.notes.append(f"{report.old_events} events are older than {destination.old_event_warning}: "
                            f"{destination.name} may already have invoiced their period (sent with their true "
                            f"timestamps)")
        log.warning("%s: %d events older than %s", destination.name, report.old_events,
                    destination.old_event_warning)
    if scope.ids is not None and report.unique_events < len(set(scope.ids)):
        report.notes.append(f"{len(set(scope.ids)) - report.unique_events} of the chosen events are no longer "
                            f"in {table}")
    if report.queued and not job.backfill_per_run:
        # After the partition's lock is released: a day's lock is always taken first.
        return DeliveryReport.combine([report, send_queued(job, this_run_only=True)], report)
    return report


def send_queued(job: DeliveryJob, this_run_only: bool = False) -> DeliveryReport:
    """Send the events queued past the grace period, one backfill per UTC day of their timestamp,
    whichever partition or task queued them; ``this_run_only`` leaves other runs' queues alone.

    Each day is read again under the day's lock, so two runs never open a backfill for the same
    events; events whose row left the warehouse meanwhile are rejected with that reason, so no
    day stays queued for ever."""
    name, ledger = job.destination.name, job.ledger
    run = job.run if this_run_only else None
    report = DeliveryReport(name, "queued", "events past the grace period, one backfill per UTC day", mode="backfill")
    reports: list[DeliveryReport] = []
    backfills = 0
    for day in sorted({day_of(row["event_timestamp"]) for row in ledger.queued(name, run=run)}):
        with day_lock(job, day):
            rows = ledger.queued(name, day, day + DAY, run=run)
            if not rows:
                continue  # another run sent them
            start, end = timeframe_for(day, max(row["event_timestamp"] for row in rows))
            with open_backfill(job, start, end, replace=False) as backfill:
                backfills += 1
                label = f"{len(rows)} queued events of {day:%Y-%m-%d} UTC, backfill {backfill['id']}"
                by_table: dict[str, list[dict]] = {}
                for row in rows:
                    by_table.setdefault(row["event_table"], []).append(row)
                day_reports = [report for table, chosen in sorted(by_table.items())
                               for report in deliver_ids(job, table, chosen, label, backfill["id"])]
                ledger.record_backfill(name, backfill, job.run, events_sent=sum(r.accepted for r in day_reports))
            reports += day_reports
            _reject_gone(job, rows)
    total = DeliveryReport.combine(reports, report)
    total.backfills = backfills
    log.info("%s: %d queued events sent inside %d backfills (one per UTC day)", name, total.accepted, backfills)
    return total


def _reject_gone(job: DeliveryJob, rows: list[dict]) -> None:
    """Queued events a backfill's delivery did not find any more (their row left the warehouse)."""
    statuses = job.ledger.status_of(job.destination.name, [row["idempotency_key"] for row in rows])
    gone = [Rejection(key=row["idempotency_key"], message_id=row["message_id"], table=row["event_table"],
                      event_timestamp=row["event_timestamp"],
                      reason=f"{row['event_table']} row id={row['message_id']}: queued for a backfill, but the row "
                             f"is no longer in the warehouse")
            for row in rows if statuses.get(row["idempotency_key"]) == QUEUED]
    if gone:
        job.ledger.mark_rejected(job.destination.name, job.run, gone, job.now(), REJECTED)


def _run(job: DeliveryJob, scope: Scope, request: ReadRequest, report: DeliveryReport, filtered: bool) -> None:
    """Read, map, send and mark, each stage in its own thread one chunk apart."""
    name = job.destination.name
    read = read_ahead(timed_iter(job.source.read(request), report, "extract"), f"{name}-read")
    ready = read_ahead((_prepare(chunk, job, request.loaded_at_column, report) for chunk in read), f"{name}-map")
    # Both readers are closed before the source's connection is (which cancels an unfinished COPY).
    with contextlib.closing(read), contextlib.closing(ready), \
            ThreadPoolExecutor(max_workers=job.concurrency, thread_name_prefix=name) as pool, \
            LedgerWriter(job.ledger, job.destination, job.run, report, job.now) as writer:
        # The events the filter leaves in the database are the window's events it did not read:
        # counted on another connection while the read starts. Not in the read's own statement: on
        # PostgreSQL 15 one statement saying both (ids grouped, each looked up in the ledger) took
        # 0.7-0.9 s for a partition of 334,000 delivered events, the two at once 0.53 s.
        window_events = pool.submit(_count_events, job, request, report) if filtered else None
        sending = Sending(job, writer, pool, report)
        for mapped, rejections in ready:
            sending.chunk(mapped, rejections, scope, filtered)
        if window_events is not None:
            # max(): rows loaded into the window between the count and the read
            report.already_delivered += max(0, window_events.result() - report.unique_events)
            report.unique_events = max(window_events.result(), report.unique_events)


def _count_events(job: DeliveryJob, request: ReadRequest, report: DeliveryReport) -> int:
    with report.timed("ledger_filter"):
        return job.source.count_events(request)


def _prepare(chunk: pd.DataFrame, job: DeliveryJob, loaded_at: str,
             report: DeliveryReport) -> tuple[Mapped, list[Rejection]]:
    """Count a chunk's rows and map it (runs in the read-ahead thread)."""
    destination = job.destination
    report.rows_read += int(chunk[COPIES].sum())
    report.duplicates_dropped += int((chunk[COPIES] - 1).sum())
    report.unique_events += len(chunk)
    if loaded_at != "timestamp":  # how late rows arrive; meaningless when selecting by event time
        late = (chunk[loaded_at] - chunk["timestamp"]).dt.total_seconds().dropna()
        if len(late):
            report.lateness_seconds.extend(late.sample(min(len(late), 2_000), random_state=0).tolist())
    now = job.now()
    if destination.old_event_warning is not None:
        report.old_events += int((chunk["timestamp"] < pd.Timestamp(now - destination.old_event_warning)).sum())
    with report.timed("transform"):
        if loaded_at != "timestamp":
            chunk[LOADED_AT] = chunk[loaded_at]  # recorded with a rejection (see Ledger.known_clause)
        mapped = destination.map_events(chunk, now)
        return mapped, [*mapped.rejected, *dedupe_keys(mapped)]
