"""Reconciliation's I/O: read the three sides, check keys, record findings, heal through the delivery core.

Healing keeps exactly-once: an event the ledger has as delivered that the destination does not hold
is marked ``lost`` in the ledger (its earlier delivery kept in ``delivery_history``) and delivered
again by :func:`usage_billing.delivery.deliver` from its warehouse row, under the same idempotency
key: live inside the grace period, through a backfill beyond it, as any late event. Nothing is
ever deleted from the destination: events it holds that the ledger does not know are reported.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np

from usage_billing.delivery.contract import DeliveryFailed
from usage_billing.delivery.job import DeliveryJob
from usage_billing.delivery.report import DeliveryReport
from usage_billing.delivery.runs import deliver_ids
from usage_billing.delivery.sending import dedupe_keys
from usage_billing.frames import pd
from usage_billing.ledger import DELIVERED, REJECTED
from usage_billing.reconcile.compare import (
    EVERY_HOUR,
    HOUR,
    MISSING_IN_DESTINATION,
    NOT_DELIVERED,
    NOT_IN_WAREHOUSE,
    UNKNOWN_TO_LEDGER,
    UNMATCHED_COUNT,
    HourLine,
    ReconcileReport,
    choose_hours,
    hours_between,
)
from usage_billing.sources import Partition, ReadRequest, Window

log = logging.getLogger(__name__)

# Hours whose ledger keys are fetched in one query (one scan of the ledger per batch).
HOURS_PER_QUERY = 24
# Keys per search request (Orb's cap, which the hook applies): only to count the requests made.
SEARCH_CHUNK = 500


class EventReader(Protocol):
    """A destination's read API (implemented by the hooks of destinations that declare ``read_api``)."""

    def event_volume(self, start: datetime, end: datetime) -> dict[datetime, int]:
        """Events held per UTC hour of their timestamp, for the hours of ``[start, end)``."""

    def search_events(self, keys: Sequence[str], start: datetime, end: datetime) -> set[str]:
        """The keys among ``keys`` held with a timestamp in ``[start, end)``."""


@dataclass(frozen=True)
class Checking:
    """How closely to check: ``sample_hours`` agreeing hours are also searched key by key; without
    ``compare_volume`` every hour's keys are searched instead of comparing hourly counts. ``rng``
    picks the sampled hours; by default it is seeded with the destination and the range, so a
    retried task checks the same hours."""

    sample_hours: int = 2
    compare_volume: bool = True
    rng: random.Random | None = None
    # Rows loaded at or after this moment that the ledger has not seen yet are the hourly runs' next
    # job, not a difference: they are counted apart (``HourLine.loaded_later``) and left out.
    loaded_before: datetime | None = None


def reconcile(job: DeliveryJob, tables: Sequence[str], start: datetime, end: datetime,
              checking: Checking = Checking()) -> ReconcileReport:
    """Compare, check keys, heal and record the findings for the whole hours covering ``[start, end)``."""
    sample_hours, compare_volume, rng = checking.sample_hours, checking.compare_volume, checking.rng
    destination, ledger = job.destination, job.ledger
    name = destination.name
    hours = hours_between(start, end)
    start, end = hours[0], hours[-1] + HOUR
    reader: EventReader | None = job.sender if destination.capabilities.read_api else None  # type: ignore[assignment]
    if reader is None:
        compared = f"warehouse and ledger only: {name} has no read API for events"
    elif compare_volume:
        compared = f"warehouse, ledger and {name} (hourly volume, then keys)"
    else:
        compared = f"warehouse, ledger and {name} by key only (reconcile.compare_volume: false)"
    report = ReconcileReport(name, start, end, compared, [HourLine(hour) for hour in hours])
    lines = {line.hour: line for line in report.lines}

    for hour, count in ledger.delivered_per_hour(name, start, end).items():
        lines[hour].ledger = count
    _tally_warehouse(job, tables, Window(start, end), checking.loaded_before, lines)
    later = sum(line.loaded_later for line in report.lines)
    if later:
        report.notes.append(f"{later} events loaded at or after {checking.loaded_before:%Y-%m-%d %H:%M} UTC and not "
                            f"delivered yet are left out: the next hourly runs deliver them")
    if reader is not None and compare_volume:
        volume = reader.event_volume(start, end)
        for line in report.lines:
            line.destination = volume.get(line.hour, 0)
    if reader is None:
        log.info("%s has no read API: reconciling the warehouse against the ledger only", name)
        return _finish(job, report)
    if not compare_volume:
        report.notes.append(f"{name}'s hourly counts are not compared (reconcile.compare_volume: false): every hour's "
                            f"delivered keys are searched; events of another ingester cannot be seen")
    choose_hours(report.lines, sample_hours, rng or random.Random(f"{name}:{start.isoformat()}:{end.isoformat()}"),
                 every_hour=not compare_volume)
    _check_keys(job, reader, tables, report, checking.loaded_before)
    _heal(job, report)
    return _finish(job, report)


def _tally_warehouse(job: DeliveryJob, tables: Sequence[str], window: Window, loaded_before: datetime | None,
                     lines: dict[datetime, HourLine]) -> None:
    """Per hour of event time: the warehouse's deliverable events, and what the ledger says of them."""
    for events in _warehouse_events(job, tables, window, loaded_before):
        keys = events.keys
        statuses = job.ledger.status_of(job.destination.name, keys) if keys else {}
        counts: Counter = Counter()
        for key, hour, late in zip(keys, events.hours, events.late, strict=True):
            status = statuses.get(key)
            if late and status not in SETTLED:
                counts[(hour, "later")] += 1
                continue
            counts[(hour, "warehouse")] += 1
            counts[(hour, status)] += 1
        for (hour, what), count in counts.items():
            line = lines.get(hour)
            if line is None:  # pragma: no cover - the read is bounded by the range
                continue
            if what == "warehouse":
                line.warehouse += count
            elif what == "later":
                line.loaded_later += count
            elif what == DELIVERED:
                line.delivered += count
            elif what == REJECTED:
                line.rejected += count


# What the ledger has settled: an event loaded late but already settled is compared as any other.
SETTLED = (DELIVERED, REJECTED)


@dataclass
class WarehouseEvents:
    """One chunk's deliverable events: key, UTC hour of the event, and whether the row was loaded at or
    after the cutoff (``loaded_before``)."""

    keys: list[str]
    hours: list[datetime]
    late: list[bool]


def _warehouse_events(job: DeliveryJob, tables: Sequence[str], window: Window,
                      loaded_before: datetime | None) -> Iterator[WarehouseEvents]:
    """The deliverable events whose timestamp lies in ``window``, chunk by chunk, mapped as a delivery
    would map them."""
    destination, now, loaded_at = job.destination, job.now(), job.loaded_at_column
    for table in tables:
        columns = job.source.table_columns(table)
        if columns is None:
            continue
        # Selected by event time, as replace mode does: the hours compared are event hours.
        wanted = list(dict.fromkeys([*destination.required_columns(columns), "timestamp", loaded_at]))
        request = ReadRequest(Partition(table), window, wanted, "timestamp", job.chunk_size)
        for chunk in job.source.read(request):
            late_ids: set = set()
            if loaded_before is not None and loaded_at in chunk.columns:
                late = (pd.to_datetime(chunk[loaded_at], utc=True, errors="coerce") >= loaded_before).to_numpy()
                # A duplicate with one copy loaded in time is not late.
                late_ids = set(chunk["id"].to_numpy()[late]) - set(chunk["id"].to_numpy()[~late])
            mapped = destination.map_events(chunk, now)
            dedupe_keys(mapped)
            hours = mapped.timestamps.astype("datetime64[h]")
            keep = (~np.isnat(hours)).tolist()
            distinct, position = np.unique(hours[np.array(keep, dtype=bool)], return_inverse=True)
            as_datetime = [datetime.fromisoformat(f"{h}:00+00:00") for h in distinct.astype(str)]
            kept = [i for i, flag in enumerate(keep) if flag]
            yield WarehouseEvents([mapped.keys[i] for i in kept], [as_datetime[p] for p in position.tolist()],
                                  [mapped.message_ids[i] in late_ids for i in kept])


def _check_keys(job: DeliveryJob, reader: EventReader, tables: Sequence[str], report: ReconcileReport,
                loaded_before: datetime | None) -> None:
    """Search the destination for the checked hours' delivered keys (what it lost) and, where it counts
    more than the ledger, for the warehouse keys the ledger has not as delivered (what it holds that
    the ledger does not know)."""
    name = job.destination.name
    checked = report.checked_hours
    for offset in range(0, len(checked), HOURS_PER_QUERY):
        batch = checked[offset:offset + HOURS_PER_QUERY]
        keys_by_hour = job.ledger.delivered_keys_in(name, [line.hour for line in batch])
        for line in batch:
            keys = keys_by_hour.get(line.hour, [])
            if keys:
                found = reader.search_events(keys, line.hour, line.hour + HOUR)
                report.searches += -(-len(keys) // SEARCH_CHUNK)
                line.lost = sorted(set(keys) - found)
            excess = (line.destination - line.ledger) if line.destination is not None else 0
            if excess > 0 or (line.checked == EVERY_HOUR and line.not_delivered + line.rejected > 0):
                suspects = _undelivered_keys(job, tables, line.hour, loaded_before)
                if suspects:
                    held = reader.search_events(list(suspects), line.hour, line.hour + HOUR)
                    report.searches += -(-len(suspects) // SEARCH_CHUNK)
                    line.unknown = sorted(held)
                    line.unknown_undelivered = sum(1 for key in held if suspects[key] not in (DELIVERED, REJECTED))


def _undelivered_keys(job: DeliveryJob, tables: Sequence[str], hour: datetime,
                      loaded_before: datetime | None) -> dict[str, str | None]:
    """The hour's deliverable warehouse keys the ledger does not have as delivered, with their status
    (rows loaded after ``loaded_before`` that the ledger has not settled are not suspects yet)."""
    suspects: dict[str, str | None] = {}
    for events in _warehouse_events(job, tables, Window(hour, hour + HOUR), loaded_before):
        statuses = job.ledger.status_of(job.destination.name, events.keys) if events.keys else {}
        suspects.update({key: statuses.get(key) for key, late in zip(events.keys, events.late, strict=True)
                         if statuses.get(key) != DELIVERED and not (late and statuses.get(key) not in SETTLED)})
    return suspects


def _heal(job: DeliveryJob, report: ReconcileReport) -> None:
    """Re-send what the destination lost, under the same keys, and record the findings."""
    destination, ledger, run, now = job.destination, job.ledger, job.run, job.now()
    name = destination.name
    hour_of_key = {key: line.hour for line in report.lines for key in line.lost}
    if not hour_of_key:
        return
    rows = ledger.mark_lost(name, list(hour_of_key), run, now,
                            reason=f"reconciliation: delivered, but {name} does not hold it; re-sent under its key")
    ledger.record_findings(name, [
        {"kind": MISSING_IN_DESTINATION, "hour": hour, "idempotency_key": key,
         "detail": f"delivered per the ledger, not found by {name}'s search for the hour"}
        for key, hour in hour_of_key.items()], run, now)
    by_table: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_table[row["event_table"]].append(row)
    for table, lost in sorted(by_table.items()):
        label = f"reconciliation: re-send {len(lost)} events {name} does not hold"
        try:
            # Read back by id, pruned on the loaded-at column only where the ledger recorded a load
            # (events once rejected, held or queued): a delivery does not record one.
            deliveries = deliver_ids(job, table, lost, label)
        except DeliveryFailed as error:
            report.notes.append(f"re-sending to {name} failed: {error}")
            continue
        delivery = DeliveryReport.combine(deliveries, DeliveryReport(name, table, label, mode="replay_rejected"))
        report.notes.append(f"{table}: re-sent {delivery.accepted} of {len(lost)} lost events "
                            f"({delivery.backfills} through backfills)")
        report.notes.extend(f"{table}: {note}" for note in delivery.notes)  # how the read was bounded, if at all
        log.info("%s", delivery.render())
    statuses = ledger.status_of(name, list(hour_of_key))
    healed = [key for key in hour_of_key if statuses.get(key) == DELIVERED]
    ledger.heal_findings(name, MISSING_IN_DESTINATION, healed, run, now)
    healed_set = set(healed)
    for line in report.lines:
        line.healed = [key for key in line.lost if key in healed_set]


def _finish(job: DeliveryJob, report: ReconcileReport) -> ReconcileReport:
    """Record what is still standing as findings (what was lost is recorded by the healing)."""
    name = job.destination.name
    findings: list[dict] = []
    for line in report.lines:
        findings += [{"kind": UNKNOWN_TO_LEDGER, "hour": line.hour, "idempotency_key": key,
                      "detail": f"held by {name}, not delivered per the ledger: reported, not deleted"}
                     for key in line.unknown]
        for kind, count, detail in (
                (NOT_DELIVERED, line.not_delivered - line.unknown_undelivered,
                 "deliverable warehouse events the ledger has neither delivered nor rejected"),
                (NOT_IN_WAREHOUSE, line.not_in_warehouse, "delivered events that are not deliverable warehouse rows"),
                (UNMATCHED_COUNT, line.unmatched, f"{name}'s count minus the ledger's, after the key check")):
            if count:
                findings.append({"kind": kind, "hour": line.hour, "events": count, "detail": detail})
    job.ledger.record_findings(name, findings, job.run, job.now())
    return report
