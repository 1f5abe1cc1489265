"""Dry run: what a delivery or a replace of a range would do, with nothing sent and nothing written.

The real core runs with two stand-ins: a :class:`Recorder` in place of the destination's transport
(every batch is "accepted" and recorded; backfills are recorded, not created) and a
:class:`ReadOnlyLedger` that answers every question from the real ledger (what is already
delivered, held, rejected) but writes nothing. So the preview goes through the very code that would
bill: the same mapping, ledger filter, key de-duplication, customer preflight and backfill routing.

The result, :class:`DryRunReport`, says per UTC day × customer × event name what would be sent,
how many events would go through backfills and how many backfills, what would be rejected and
why, and — for a replace, when the destination can be read back — how the replaced period's hourly
counts would change against what the destination holds now.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from usage_billing.delivery.contract import BatchOutcome
from usage_billing.delivery.job import DeliveryJob
from usage_billing.delivery.report import DeliveryReport
from usage_billing.delivery.runs import deliver_window, replace_window, send_queued
from usage_billing.ledger import QUEUED, REJECTED
from usage_billing.sources import Partition, Window

# Writes without a mark_ or record_ prefix; mark_rejected and mark_delivered are methods below.
_WRITES = ("create", "refresh_statistics")


class ReadOnlyLedger:
    """The real ledger for reading; every write is dropped (a dry run leaves no trace), except that
    events queued for a backfill are kept in memory, so the preview sends them as the run would."""

    def __init__(self, ledger: Any):
        self._ledger = ledger
        self._queued: dict[str, dict] = {}

    def __getattr__(self, name: str) -> Any:
        if name in _WRITES or name.startswith(("mark_", "record_")):
            return lambda *args, **kwargs: None
        return getattr(self._ledger, name)

    def mark_rejected(self, destination: str, run: Any, rejections: Any, now: datetime, status: str = REJECTED) -> None:
        if status == QUEUED:
            self._queued.update({r.key: {"idempotency_key": r.key, "message_id": r.message_id,
                                         "event_table": r.table, "event_timestamp": r.event_timestamp}
                                 for r in rejections})

    def mark_delivered(self, destination: str, run: Any, events: Any, *args: Any) -> None:
        for key in events.keys:
            self._queued.pop(key, None)

    def queued(self, destination: str, start: datetime | None = None, end: datetime | None = None,
               run: Any = None) -> list[dict]:
        return sorted((row for row in self._queued.values()
                       if (start is None or row["event_timestamp"] >= start)
                       and (end is None or row["event_timestamp"] < end)), key=lambda row: row["event_timestamp"])

    def status_of(self, destination: str, keys: Any) -> dict[str, str]:
        statuses = self._ledger.status_of(destination, keys)
        return {**statuses, **{key: QUEUED for key in keys if key in self._queued}}

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        yield  # nothing is written, so nothing needs serialising


@dataclass
class Recorder:
    """Stands in for the destination's hook: accepts and records every event, creates nothing.

    ``directory`` (the real hook, optional) answers customer lookups, which only read."""

    directory: Any = None
    sent: list[tuple[dict, str | None]] = field(default_factory=list)
    backfills: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send(self, events: list[dict], keys: list[str], backfill_id: str | None = None) -> BatchOutcome:
        with self._lock:
            self.sent.extend((event, backfill_id) for event in events)
        return BatchOutcome(accepted=list(keys), requests=0)

    def customer_exists(self, external_id: str) -> bool:
        return True if self.directory is None else self.directory.customer_exists(external_id)

    def open_backfill(self, start: datetime, end: datetime, replace: bool) -> dict:
        with self._lock:
            backfill = {"id": f"dry-run-{len(self.backfills) + 1}", "status": "pending", "timeframe_start": start,
                        "timeframe_end": end, "replace_existing_events": replace}
            self.backfills.append(backfill)
            return backfill

    def close_backfill(self, backfill_id: str) -> dict:
        return {"id": backfill_id, "status": "pending"}


@dataclass
class DryRunReport:
    """What the run would do; :meth:`render` is the task log's preview."""

    destination: str
    mode: str
    window: Window
    delivery: DeliveryReport
    would_send: Counter = field(default_factory=Counter)  # (day, customer, event name) -> events
    in_backfills: int = 0
    backfills: int = 0
    # Replace only, when the destination can be read back: hour -> (held now, would hold after).
    replace_change: dict[datetime, tuple[int, int]] = field(default_factory=dict)

    def render(self) -> str:
        d = self.delivery
        lines = [f"DRY RUN ({self.mode}) for {self.destination}, {self.window}: nothing was sent, nothing written",
                 f"  would send        {sum(self.would_send.values())} events "
                 f"({self.in_backfills} through {self.backfills} backfills)",
                 f"  already delivered {d.already_delivered} (skipped)",
                 f"  would reject      {d.rejected} ({d.rejected - d.rejected_before} new)",
                 *(f"    {count:>8} x {reason}" for reason, count in d.reasons.most_common(10)),
                 f"  would hold        {d.held}"]
        if d.unknown_customers:
            named = ", ".join(f"{c} ({n})" for c, n in d.unknown_customers.most_common(10))
            lines.append(f"  unknown customers {named}")
        lines.append(f"  {'day':<12}{'customer':<28}{'event':<28}{'events':>8}")
        for (day, customer, event), count in sorted(self.would_send.items()):
            lines.append(f"  {day:<12}{customer or '-':<28.28}{event or '-':<28.28}{count:>8}")
        if self.replace_change:
            lines.append(f"  replace would change what {self.destination} holds, per hour (now -> after):")
            for hour, (now, after) in sorted(self.replace_change.items()):
                if now != after:
                    lines.append(f"    {hour:%Y-%m-%d %H:00}  {now:>8} -> {after:<8} ({after - now:+d})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"destination": self.destination, "mode": self.mode, "start": self.window.start.isoformat(),
                "end": self.window.end.isoformat(), "would_send": sum(self.would_send.values()),
                "in_backfills": self.in_backfills, "backfills": self.backfills,
                "already_delivered": self.delivery.already_delivered, "would_reject": self.delivery.rejected,
                "would_hold": self.delivery.held,
                "by_day_customer_event": [[*key, count] for key, count in sorted(self.would_send.items())],
                # Only the hours a replace would change: [hour (ISO), held now, would hold after].
                "replace_change": [[f"{hour:%Y-%m-%dT%H:00}", now, after]
                                   for hour, (now, after) in sorted(self.replace_change.items()) if now != after]}


def dry_run(job: DeliveryJob, tables: Sequence[str], window: Window, replace: bool = False) -> DryRunReport:
    """Preview a delivery of ``window`` (or, with ``replace``, a replace of it) through the real core."""
    recorder = Recorder(directory=job.sender if job.destination.capabilities.customer_lookup else None)
    # Late events are queued, then sent one backfill per day for the whole preview, as a DAG run does.
    preview = dataclasses.replace(job, sender=recorder, ledger=ReadOnlyLedger(job.ledger), backfill_per_run=True)
    if replace:
        delivery = replace_window(preview, list(tables), window)
    else:
        reports = [deliver_window(preview, Partition(table), window) for table in tables]
        if job.destination.capabilities.backfills:
            reports.append(send_queued(preview))
        delivery = DeliveryReport.combine(reports, DeliveryReport(job.destination.name, ",".join(tables), str(window)))
    report = DryRunReport(job.destination.name, "replace" if replace else "deliver", window, delivery,
                          backfills=len(recorder.backfills))
    for event, backfill_id in recorder.sent:
        customer, name = job.destination.describe(event)
        stamp = event.get("timestamp") or ""
        report.would_send[(stamp[:10], customer, name)] += 1
        report.in_backfills += backfill_id is not None
    if replace and job.destination.capabilities.read_api:
        report.replace_change = _replace_change(job, recorder, window)
    return report


def _replace_change(job: DeliveryJob, recorder: Recorder, window: Window) -> dict[datetime, tuple[int, int]]:
    """Per hour: what the destination counts now, and what it would hold once the replace closes
    (exactly the events the replace sends: replace_existing_events drops the rest)."""
    now = job.sender.event_volume(window.start, window.end)  # type: ignore[attr-defined]  # declared read API
    after: Counter = Counter()
    for event, _ in recorder.sent:
        after[datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).replace(minute=0, second=0,
                                                                                         microsecond=0)] += 1
    return {hour: (now.get(hour, 0), after.get(hour, 0)) for hour in sorted(set(now) | set(after))}
