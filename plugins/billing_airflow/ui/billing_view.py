"""What was billed, read from the ledger: the numbers and the HTML of the Billing view.

Per day of the events' own timestamps (the day they are billed for) and destination: events
delivered, of which sent through Orb backfills, and rejected; the rejections grouped by reason with
a few examples and a link to the destination's replay DAG; the Orb backfills and their status.
Everything comes from the ledger's tables (``deliveries``, ``backfills``) by SQL that runs on
PostgreSQL and SQLite alike; nothing here writes.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa

from usage_billing.ledger import DELIVERED, REJECTED, Ledger, generic_reason

#: Examples shown per rejection reason.
EXAMPLES = 3


@dataclass
class DayRow:
    """One day x destination of the billing table."""

    day: str
    destination: str
    delivered: int = 0
    via_backfills: int = 0
    rejected: int = 0


@dataclass
class ReasonRow:
    """One rejection reason of a destination, with its count and a few examples."""

    destination: str
    reason: str
    count: int
    examples: list[dict] = field(default_factory=list)


@dataclass
class BillingSummary:
    days: list[DayRow]
    reasons: list[ReasonRow]
    backfills: list[dict]


def _day(value: Any) -> str:
    """``date(...)`` comes back as a date (PostgreSQL) or a string (SQLite)."""
    if isinstance(value, datetime | date):
        return value.isoformat()[:10]
    return str(value)[:10] if value else "(no timestamp)"


def _tables_exist(ledger: Ledger) -> bool:
    inspector = sa.inspect(ledger.engine)
    return inspector.has_table("deliveries", schema=ledger.schema)


def summarize(ledger: Ledger) -> BillingSummary:
    """The Billing view's numbers, from the ledger's tables."""
    if not _tables_exist(ledger):
        return BillingSummary([], [], [])
    t = ledger.table.c
    day = sa.func.date(t.event_timestamp)
    days: dict[tuple[str, str], DayRow] = {}
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(day.label("day"), t.destination, t.status, (t.backfill_id.is_not(None)).label("backfill"),
                      sa.func.count().label("n"))
            .group_by(day, t.destination, t.status, t.backfill_id.is_not(None)))
        for row in rows:
            key = (_day(row.day), row.destination)
            entry = days.setdefault(key, DayRow(*key))
            if row.status == DELIVERED:
                entry.delivered += row.n
                if row.backfill:
                    entry.via_backfills += row.n
            elif row.status == REJECTED:
                entry.rejected += row.n
        # Reasons name the row ("api_call row id=...: ..."); grouped here without the id.
        counts: Counter = Counter()
        examples: dict[tuple[str, str], list[dict]] = defaultdict(list)
        rejected = conn.execute(
            sa.select(t.destination, t.reason, t.message_id, t.event_table, t.event_timestamp, t.attempts)
            .where(t.status == REJECTED).order_by(t.destination, t.event_timestamp, t.idempotency_key))
        for row in rejected:
            key = (row.destination, generic_reason(row.reason))
            counts[key] += 1
            if len(examples[key]) < EXAMPLES:
                examples[key].append({"message_id": row.message_id, "event_table": row.event_table,
                                      "day": _day(row.event_timestamp), "attempts": row.attempts})
        backfills = []
        if sa.inspect(ledger.engine).has_table("backfills", schema=ledger.schema):
            backfills = [dict(r._mapping) for r in conn.execute(
                sa.select(ledger.backfills).order_by(ledger.backfills.c.timeframe_start))]
    reasons = [ReasonRow(destination, reason, count, examples[(destination, reason)])
               for (destination, reason), count in sorted(counts.items(), key=lambda item: (item[0][0], -item[1]))]
    return BillingSummary(sorted(days.values(), key=lambda r: (r.day, r.destination), reverse=False), reasons,
                          backfills)


# ------------------------------------------------------------------------------------------ HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1a202c; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; margin-top: .5rem; }
th, td { border-bottom: 1px solid #e2e8f0; padding: .35rem .8rem; text-align: left; font-size: .9rem; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f7fafc; } .muted { color: #718096; font-size: .85rem; } code { font-size: .8rem; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def replay_dag(destination: str) -> str:
    return f"segment_to_{destination}_replay_rejected"


def render(summary: BillingSummary, base_url: str = "") -> str:
    """The view as one HTML page; numbers carry ``data-testid`` attributes (tests, scraping)."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Billing</title><style>{_STYLE}</style>"
           "</head><body><h1>Billing: what the ledger says was delivered</h1>",
           "<p class='muted'>Days are the events' own timestamps (UTC), the day they are billed for. "
           "Delivered counts include events sent through Orb backfills.</p>"]
    out.append("<h2>Per day and destination</h2>")
    if not summary.days:
        out.append("<p>No delivery yet: the ledger is empty. Backfill a DAG from its Trigger button.</p>")
    else:
        out.append("<table id='days'><tr><th>day</th><th>destination</th><th>delivered</th>"
                   "<th>of which through backfills</th><th>rejected</th></tr>")
        for row in summary.days:
            cell = f"{row.destination}-{row.day}"
            out.append(f"<tr><td>{_e(row.day)}</td><td>{_e(row.destination)}</td>"
                       f"<td class='n' data-testid='delivered-{cell}'>{row.delivered}</td>"
                       f"<td class='n' data-testid='backfills-{cell}'>{row.via_backfills}</td>"
                       f"<td class='n' data-testid='rejected-{cell}'>{row.rejected}</td></tr>")
        out.append("</table>")
    out.append("<h2>Rejections by reason</h2>")
    if not summary.reasons:
        out.append("<p>No rejected event.</p>")
    else:
        out.append("<table id='reasons'><tr><th>destination</th><th>reason</th><th>events</th><th>examples "
                   "(message id, table, day, attempts)</th><th>replay</th></tr>")
        for number, row in enumerate(summary.reasons):
            examples = "<br>".join(f"<code>{_e(x['message_id'])}</code> {_e(x['event_table'])} {_e(x['day'])} "
                                   f"x{_e(x['attempts'])}" for x in row.examples)
            link = f"{base_url}/dags/{replay_dag(row.destination)}"
            out.append(f"<tr><td>{_e(row.destination)}</td><td>{_e(row.reason)}</td>"
                       f"<td class='n' data-testid='reason-count-{number}'>{row.count}</td><td>{examples}</td>"
                       f"<td><a target='_top' href='{_e(link)}'>replay in {_e(replay_dag(row.destination))}</a>"
                       f"<br><span class='muted'>Trigger, with Reason contains: the reason's text</span></td></tr>")
        out.append("</table>")
    out.append("<h2>Orb backfills</h2>")
    if not summary.backfills:
        out.append("<p>No Orb backfill yet.</p>")
    else:
        out.append("<table id='backfills'><tr><th>backfill</th><th>timeframe (UTC)</th><th>replaces Orb's events</th>"
                   "<th>status</th><th>events sent</th><th>created</th><th>closed</th><th>run</th></tr>")
        for backfill in summary.backfills:
            out.append(
                f"<tr><td><code>{_e(backfill['backfill_id'])}</code></td>"
                f"<td>{_e(backfill['timeframe_start'])} .. {_e(backfill['timeframe_end'])}</td>"
                f"<td>{'yes' if backfill['replace_existing_events'] else 'no'}</td>"
                f"<td data-testid='backfill-status-{_e(backfill['backfill_id'])}'>{_e(backfill['status'])}</td>"
                f"<td class='n'>{_e(backfill['events_sent'])}</td><td>{_e(backfill['created_at'])}</td>"
                f"<td>{_e(backfill['closed_at'])}</td><td>{_e(backfill['dag_id'])}<br>"
                f"<span class='muted'>{_e(backfill['run_id'])}</span></td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
