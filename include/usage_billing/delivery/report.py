"""What a delivery task did, as counts a data engineer can add up, and the summary block of its log."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

# Counters that add up across reports (the partitions of a run, the batches of a replay).
_ADDITIVE = ("rows_read", "duplicates_dropped", "unique_events", "mapping_rejected", "rejected_before", "held",
             "already_delivered", "queued", "sent", "accepted", "destination_rejected", "sent_in_backfills",
             "backfills", "old_events", "batches", "requests", "retries", "bisections", "seconds")


@dataclass
class DeliveryReport:
    """Counts for one task: what it extracted, skipped, sent and rejected, and why.

    ``already_delivered`` counts the events skipped as settled: delivered, or rejected from the
    same load of their row (a window leaves those to a replay, or to the row being loaded again).
    ``rejected_before`` counts the rejections this task made of events the ledger already held as
    rejected (a replay, or a row loaded again and refused again), so runs add up without counting
    an event twice: new rejections are ``rejected - rejected_before``.
    """

    destination: str
    partition: str
    window: str
    mode: str = "deliver"
    rows_read: int = 0
    duplicates_dropped: int = 0
    unique_events: int = 0
    mapping_rejected: int = 0
    rejected_before: int = 0
    held: int = 0
    already_delivered: int = 0
    # Past the grace period: queued in the ledger for one backfill per UTC day (sent by send_queued).
    queued: int = 0
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
    cost: str = ""
    reasons: Counter = field(default_factory=Counter)
    # Events per billing customer the destination does not know (sent anyway, or held).
    unknown_customers: Counter = field(default_factory=Counter)
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
    def combine(cls, reports: Sequence[DeliveryReport], template: DeliveryReport) -> DeliveryReport:
        """One report adding up several (the tables of a replace, the batches of a replay), labelled
        like ``template``."""
        total = cls(destination=template.destination, partition=template.partition, window=template.window,
                    mode=template.mode)
        for report in reports:
            for name in _ADDITIVE:
                setattr(total, name, getattr(total, name) + getattr(report, name))
            total.reasons.update(report.reasons)
            total.unknown_customers.update(report.unknown_customers)
            total.stages.update(report.stages)
            total.notes.extend(report.notes)
            total.lateness_seconds.extend(report.lateness_seconds)
        # A source counts its queries for its whole task, so the latest report's cost is the total.
        total.cost = next((r.cost for r in reversed(reports) if r.cost), "")
        return total

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items()
                if k not in ("reasons", "lateness_seconds", "stages", "_stage_lock", "unknown_customers")}
        data["unknown_customers"] = dict(self.unknown_customers.most_common(100))
        data["rejected"] = self.rejected
        data["stages"] = {stage: round(seconds, 3) for stage, seconds in self.stages.items()}
        data["top_reasons"] = self.reasons.most_common(5)
        data["lateness"] = lateness_summary(self.lateness_seconds)
        return data

    def render(self) -> str:
        """The summary block a data engineer reads in the task log."""
        rate = self.sent / self.seconds if self.seconds else 0.0
        if self.mode == "replace":
            routed = f" (all inside {self.backfills} replacing backfill{'s' * (self.backfills != 1)})"
        elif self.backfills or self.sent_in_backfills:
            inside = f"{self.backfills} backfills" if self.backfills > 1 else "one backfill"
            routed = f" ({self.sent_in_backfills} sent inside {inside}: older than the grace period)"
        else:
            routed = ""
        lines = [
            f"usage_billing summary: destination={self.destination} partition={self.partition} mode={self.mode}",
            f"  window            {self.window}",
            f"  extracted         {self.unique_events} unique events ({self.rows_read} rows read by this task, "
            f"{self.duplicates_dropped} duplicate rows dropped)",
            f"  skipped           {self.already_delivered} already settled in the ledger (delivered, or rejected "
            f"and not loaded again since)",
            f"  sent              {self.sent} events in {self.batches} batches ({self.requests} requests, "
            f"{self.retries} retries, {self.bisections} bisections)",
            f"  accepted          {self.accepted}{routed}",
            f"  rejected          {self.rejected} ({self.rejected - self.rejected_before} new, "
            f"{self.rejected_before} already rejected before; {self.mapping_rejected} by the mapping, "
            f"{self.destination_rejected} by {self.destination})",
        ]
        for reason, count in self.reasons.most_common(5):
            lines.append(f"    {count:>8} x {reason}")
        if self.unknown_customers:
            named = ", ".join(f"{customer} ({count})" for customer, count in self.unknown_customers.most_common(10))
            more = len(self.unknown_customers) - 10
            lines.append(f"  unknown customers {sum(self.unknown_customers.values())} events of "
                         f"{len(self.unknown_customers)} customers {self.destination} does not have: {named}"
                         + (f" and {more} more" if more > 0 else ""))
        if self.queued:
            lines.append(f"  queued            {self.queued} older than {self.destination}'s grace period: sent one "
                         f"backfill per UTC day once the run's partitions are done")
        if self.held:
            lines.append(f"  held              {self.held} (stamped too far in the future, or of an unknown "
                         f"customer; sent by a later run once due)")
        late = lateness_summary(self.lateness_seconds)
        if late:
            lines.append(f"  lateness          loaded after event time: median {late['median']}, "
                         f"p99 {late['p99']}, max {late['max']}")
        if self.cost:
            lines.append(f"  warehouse         {self.cost}")
        lines.append(f"  duration          {self.seconds:.1f} s, {rate:.0f} events/s sent")
        if self.stages:
            lines.append("  stages (overlap)  " + ", ".join(f"{stage} {seconds:.1f}s"
                                                          for stage, seconds in self.stages.items()))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def lateness_summary(seconds: Sequence[float]) -> dict[str, str]:
    """Median, p99 and max of how long after their event time rows were loaded."""
    if not len(seconds):
        return {}
    values = np.asarray(seconds, dtype=float)

    def fmt(x: float) -> str:
        return f"{x / 3600:.1f}h" if x >= 3600 else f"{x / 60:.1f}m" if x >= 60 else f"{x:.0f}s"
    return {"median": fmt(float(np.median(values))), "p99": fmt(float(np.percentile(values, 99))),
            "max": fmt(float(values.max()))}
