"""The pure part of reconciliation: per-hour lines, which hours to check by key, and what a difference means.

No I/O: :mod:`usage_billing.reconcile.run` fills the lines from the warehouse, the ledger and the
destination; everything here is decided from the numbers and keys it found.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

HOUR = timedelta(hours=1)

# Finding kinds, as the ledger's findings table records them.
MISSING_IN_DESTINATION = "missing_in_destination"
UNKNOWN_TO_LEDGER = "unknown_to_ledger"
UNMATCHED_COUNT = "unmatched_count"
NOT_DELIVERED = "not_delivered"
NOT_IN_WAREHOUSE = "not_in_warehouse"

# Why an hour was checked key by key.
DISAGREES, SAMPLE, EVERY_HOUR = "disagrees", "sample", "every hour"


def hour_of(moment: datetime) -> datetime:
    """The UTC hour a moment falls in."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """The whole UTC hours covering ``[start, end)``: from the hour of ``start`` to the end of the
    hour ``end`` falls in (an hour-aligned end is exclusive), as Orb's volume endpoint widens them."""
    first, last = hour_of(start), hour_of(end)
    if last != end.astimezone(UTC):
        last += HOUR
    if last <= first:
        raise ValueError(f"reconcile: the range [{start.isoformat()}, {end.isoformat()}) holds no hour")
    return [first + HOUR * n for n in range(int((last - first) / HOUR))]


@dataclass
class HourLine:
    """One hour of event time, as the warehouse, the ledger and the destination see it.

    ``warehouse`` counts the deliverable events (rows the mapping turns into events); of those,
    ``delivered`` and ``rejected`` are what the ledger says about them. ``ledger`` counts the
    ledger's own delivered rows of the hour, ``destination`` the destination's count (None when it
    is not compared). ``lost`` and ``unknown`` are what the key-level check found; ``healed`` the
    lost keys re-sent and confirmed."""

    hour: datetime
    warehouse: int = 0
    delivered: int = 0
    rejected: int = 0
    ledger: int = 0
    destination: int | None = None
    checked: str = ""
    lost: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    # Of ``unknown``, those the warehouse has but the ledger neither delivered nor rejected.
    unknown_undelivered: int = 0
    healed: list[str] = field(default_factory=list)
    # Deliverable events loaded after the comparison's cutoff and not settled yet: not compared.
    loaded_later: int = 0

    @property
    def not_delivered(self) -> int:
        """Deliverable warehouse events the ledger has neither delivered nor rejected."""
        return self.warehouse - self.delivered - self.rejected

    @property
    def not_in_warehouse(self) -> int:
        """Delivered events of the hour the warehouse no longer has as deliverable rows."""
        return max(0, self.ledger - self.delivered)

    @property
    def unmatched(self) -> int:
        """The destination's count minus what the ledger and the key check account for: events no
        key of the warehouse or the ledger matches (another system ingesting into the account)."""
        if self.destination is None:
            return 0
        return self.destination - self.ledger + len(self.lost) - len(self.unknown)

    def agrees(self) -> bool:
        """The counts alone agree (which is no proof: a sample of such hours is checked by key)."""
        return (self.not_delivered == 0 and self.not_in_warehouse == 0
                and (self.destination is None or self.destination == self.ledger))

    def explain(self, destination: str) -> list[str]:
        """Each difference of the hour in words, with what was done about it."""
        lines = []
        if self.lost:
            lines.append(f"{len(self.lost)} delivered per the ledger but not held by {destination}: re-sent under "
                         f"their keys, {len(self.healed)} healed")
        if self.unknown:
            lines.append(f"{len(self.unknown)} held by {destination} but not delivered per the ledger (a lost mark): "
                         f"reported, not deleted")
        rest = self.not_delivered - self.unknown_undelivered
        if rest > 0:
            lines.append(f"{rest} in the warehouse neither delivered nor rejected per the ledger: the sweep "
                         f"delivers them")
        if self.not_in_warehouse:
            lines.append(f"{self.not_in_warehouse} delivered events are no longer deliverable rows in the warehouse "
                         f"(row deleted, or the mapping now refuses it)")
        if self.unmatched > 0:
            lines.append(f"{self.unmatched} events in {destination} match no key of the warehouse or the ledger "
                         f"(another system ingesting into this account?)")
        elif self.unmatched < 0:
            lines.append(f"{-self.unmatched} fewer events in {destination} than the keys found there")
        if self.rejected:
            lines.append(f"{self.rejected} rejected (ledger; replay them with the "
                         f"segment_to_{destination}_replay_rejected DAG)")
        return lines

    def unresolved(self, destination: str) -> list[str]:
        """What still disagrees after healing: each makes the task fail."""
        problems = []
        if len(self.healed) < len(self.lost):
            problems.append(f"{len(self.lost) - len(self.healed)} events lost by {destination} were not re-delivered")
        if self.unknown:
            problems.append(f"{len(self.unknown)} events held by {destination} are not delivered per the ledger")
        if self.not_delivered - self.unknown_undelivered > 0:
            problems.append(f"{self.not_delivered - self.unknown_undelivered} warehouse events are not delivered")
        if self.not_in_warehouse:
            problems.append(f"{self.not_in_warehouse} delivered events are not in the warehouse")
        if self.unmatched:
            problems.append(f"{destination} counts {self.unmatched:+d} events no key explains")
        return problems


def choose_hours(lines: Iterable[HourLine], sample: int, rng: random.Random, every_hour: bool = False) -> None:
    """Mark the hours to check key by key: every hour whose counts disagree, and ``sample`` of the
    agreeing hours that hold delivered events (equal totals can hide two different sets). With
    ``every_hour`` (no counts from the destination to go by), every hour holding delivered events."""
    agreeing = []
    for line in lines:
        if every_hour:
            line.checked = EVERY_HOUR if line.ledger or not line.agrees() else ""
        elif not line.agrees():
            line.checked = DISAGREES
        elif line.ledger:
            agreeing.append(line)
    for line in rng.sample(agreeing, min(sample, len(agreeing))):
        line.checked = SAMPLE


@dataclass
class ReconcileReport:
    """What one reconciliation compared, found and healed; :meth:`render` is the task log's table."""

    destination: str
    start: datetime
    end: datetime
    # What was compared, in words ("warehouse, ledger and orb", "... only: kable has no read API").
    compared: str
    lines: list[HourLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    searches: int = 0

    @property
    def lost(self) -> int:
        return sum(len(line.lost) for line in self.lines)

    @property
    def healed(self) -> int:
        return sum(len(line.healed) for line in self.lines)

    @property
    def unknown(self) -> int:
        return sum(len(line.unknown) for line in self.lines)

    @property
    def checked_hours(self) -> list[HourLine]:
        return [line for line in self.lines if line.checked]

    def unresolved(self) -> list[str]:
        """Every difference still standing after healing, hour by hour."""
        return [f"{line.hour:%Y-%m-%d %H}:00 {problem}" for line in self.lines
                for problem in line.unresolved(self.destination)]

    def render(self) -> str:
        """The per-hour table: warehouse / ledger / destination, the key check, what each difference
        means and what was healed. Hours with no event anywhere are left out (and counted)."""
        name = self.destination
        header = (f"  {'hour (UTC)':<16}{'warehouse':>10}{'ledger':>8}{name:>8}{'checked':>11}{'healed':>8}"
                  f"  disagreement")
        lines = [f"reconciliation: destination={name} [{self.start:%Y-%m-%d %H:%M}, {self.end:%Y-%m-%d %H:%M}) UTC "
                 f"by event time; compared {self.compared}", header]
        empty = 0
        for line in self.lines:
            remote = "n/a" if line.destination is None else str(line.destination)
            explained = line.explain(name)
            if not (line.warehouse or line.ledger or line.destination or explained):
                empty += 1
                continue
            status = "; ".join(explained) if explained else "agrees"
            lines.append(f"  {line.hour:%Y-%m-%d %H}:00{line.warehouse:>10}{line.ledger:>8}{remote:>8}"
                         f"{line.checked or '-':>11}{len(line.healed):>8}  {status}")
        totals = (sum(x.warehouse for x in self.lines), sum(x.ledger for x in self.lines),
                  sum(x.destination or 0 for x in self.lines))
        remote_total = str(totals[2]) if any(x.destination is not None for x in self.lines) else "n/a"
        lines.append(f"  {'total':<16}{totals[0]:>10}{totals[1]:>8}{remote_total:>8}"
                     f"{len(self.checked_hours):>11}{self.healed:>8}")
        if empty:
            lines.append(f"  ({empty} hours without any event left out)")
        lines.append(f"  key check: {len(self.checked_hours)} hours ({self.searches} search requests): {self.lost} "
                     f"lost by {name} ({self.healed} healed), {self.unknown} held by {name} unknown to the ledger")
        lines.extend(f"  note: {note}" for note in self.notes)
        unresolved = self.unresolved()
        lines.append(f"  result: DISAGREES, {len(unresolved)} differences remain" if unresolved else "  result: agrees")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"destination": self.destination, "start": self.start.isoformat(), "end": self.end.isoformat(),
                "hours": len(self.lines), "checked_hours": len(self.checked_hours), "lost": self.lost,
                "healed": self.healed, "unknown_to_ledger": self.unknown, "unresolved": len(self.unresolved())}
