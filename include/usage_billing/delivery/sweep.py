"""The completeness sweep: the safety net for rows loaded later than ``source.lookback``.

Daily, for each destination, it scans a horizon (default 7 days) of the warehouse on the loaded-at
column, finds events that are neither delivered nor rejected, and delivers them (through Orb
backfills where they are past the grace period). It logs a per-day table, by event day:
events in the warehouse, delivered, rejected, missing before the sweep, delivered by the sweep,
and still missing after it (zero when the sweep succeeded).

Its final count of every event day it saw whole is stored in the ledger (``day_counts``): the
Billing view's "in the warehouse" and "missing" columns, which the view itself never counts (a
warehouse may bill by the byte scanned, and a page view must not start a scan).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, time, timedelta

from usage_billing.delivery.job import DeliveryJob
from usage_billing.delivery.report import DeliveryReport
from usage_billing.delivery.runs import deliver_window, send_queued
from usage_billing.ledger import DELIVERED, HELD, REJECTED
from usage_billing.sources import Partition, ReadRequest, Window


@dataclass
class DayCounts:
    warehouse: int = 0
    delivered: int = 0
    rejected: int = 0
    # Stamped too far in the future: not missing, sent once due.
    held: int = 0

    @property
    def missing(self) -> int:
        return self.warehouse - self.delivered - self.rejected - self.held


@dataclass
class SweepReport:
    destination: str
    window: Window
    before: dict[date, DayCounts] = field(default_factory=dict)
    after: dict[date, DayCounts] = field(default_factory=dict)
    deliveries: list[DeliveryReport] = field(default_factory=list)
    # The event days whose count after the sweep is stored in the ledger (see whole_days).
    recorded: list[date] = field(default_factory=list)

    @property
    def missing_before(self) -> int:
        return sum(c.missing for c in self.before.values())

    @property
    def missing_after(self) -> int:
        return sum(c.missing for c in self.after.values())

    @property
    def delivered_by_sweep(self) -> int:
        return sum(c.delivered for c in self.after.values()) - sum(c.delivered for c in self.before.values())

    def render(self) -> str:
        lines = [f"completeness sweep: destination={self.destination} horizon {self.window}",
                 f"  {'event day':<12}{'warehouse':>10}{'delivered':>10}{'rejected':>10}{'missing':>10}"
                 f"{'by sweep':>10}{'still missing':>15}"]
        for day in sorted(set(self.before) | set(self.after)):
            before, after = self.before.get(day, DayCounts()), self.after.get(day, DayCounts())
            lines.append(f"  {day.isoformat():<12}{after.warehouse:>10}{after.delivered:>10}{after.rejected:>10}"
                         f"{before.missing:>10}{after.delivered - before.delivered:>10}{after.missing:>15}")
        lines.append(f"  total: {self.missing_before} missing before the sweep, {self.delivered_by_sweep} delivered "
                     f"by it, {self.missing_after} still missing")
        if self.recorded:
            lines.append(f"  recorded for the Billing view (ledger day_counts): event days {self.recorded[0]} .. "
                         f"{self.recorded[-1]}, the whole days of the horizon")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"destination": self.destination, "missing_before": self.missing_before,
                "delivered_by_sweep": self.delivered_by_sweep, "missing_after": self.missing_after}


def tally(job: DeliveryJob, tables: Sequence[str], window: Window) -> dict[date, DayCounts]:
    """Per event day: unique events in the warehouse window, and how many the ledger has as
    delivered or rejected for this destination."""
    destination, ledger, now = job.destination, job.ledger, job.now()
    days: dict[date, DayCounts] = {}
    for table in tables:
        columns = job.source.table_columns(table)
        if columns is None:
            continue
        request = ReadRequest(Partition(table), window, [*destination.required_columns(columns), job.loaded_at_column],
                              job.loaded_at_column, job.chunk_size)
        for chunk in job.source.read(request):
            mapped = destination.map_events(chunk, now)
            undelivered = [*mapped.rejected, *mapped.held]
            keys = mapped.keys + [r.key for r in undelivered]
            stamps = [mapped.timestamp(i) for i in range(len(mapped))] + [r.event_timestamp for r in undelivered]
            statuses = ledger.status_of(destination.name, keys) if keys else {}
            counts: Counter = Counter()
            for key, stamp in zip(keys, stamps, strict=True):
                day = stamp.date() if stamp is not None else date.min
                counts[(day, "warehouse")] += 1
                counts[(day, statuses.get(key))] += 1
            for (day, what), count in counts.items():
                entry = days.setdefault(day, DayCounts())
                if what == "warehouse":
                    entry.warehouse += count
                elif what == DELIVERED:
                    entry.delivered += count
                elif what == REJECTED:
                    entry.rejected += count
                elif what == HELD:
                    entry.held += count
    return dict(sorted(days.items()))


def whole_days(window: Window) -> list[date]:
    """The UTC event days a scan of ``window`` (on the loaded-at column) counts whole: those that
    begin at or after the scan's start and end by its end.

    A row is loaded after its event time, so every row of such a day loaded by the window's end is
    in the scan. The day the horizon starts in is cut (its rows loaded before the start are not read),
    and so is the day the sweep runs in (not over yet): storing their counts would understate them."""
    start, end = window.scan_start.astimezone(UTC), window.end.astimezone(UTC)
    first = start.date() if start.time() == time() else start.date() + timedelta(days=1)
    last = (end - timedelta(days=1)).date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def sweep(job: DeliveryJob, tables: Sequence[str], window: Window) -> SweepReport:
    """Count, deliver what is missing (rejected events are left to a replay), count again, and store
    the final count of each whole event day in the ledger (a day without events counts zero).

    Late events of every table go out together at the end, one backfill per UTC day (with any queue
    an earlier run left behind): a month's catch-up costs one backfill per day of the month."""
    job = dataclasses.replace(job, retry_rejected=False, backfill_per_run=True)
    report = SweepReport(job.destination.name, window)
    report.before = tally(job, tables, window)
    report.deliveries = [deliver_window(job, Partition(table), window) for table in tables]
    if job.destination.capabilities.backfills:
        report.deliveries.append(send_queued(job))
    report.after = tally(job, tables, window)
    report.recorded = whole_days(window)
    job.ledger.record_day_counts(job.destination.name, {day: dataclasses.asdict(report.after.get(day, DayCounts()))
                                                        for day in report.recorded}, job.run, job.now())
    return report
