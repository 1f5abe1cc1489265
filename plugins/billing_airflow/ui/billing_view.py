"""What was billed, read from the ledger: the numbers and the HTML of the Billing view.

Per day of the events' own timestamps (the day they are billed for) and destination: the events in
the warehouse and those missing (neither delivered, rejected nor held), as the daily sweep
last counted the day; events delivered, of which sent through Orb backfills, rejected, held; and what
reconciliation found (events a destination lost, and whether re-sending healed them; events a
destination holds that the ledger does not know; warehouse events not delivered, as the latest
reconciliation of the day's hours counted).
The rejections and the held events grouped by reason with a few examples, each rejection reason
linked to the destination's replay DAG; per destination, one row per billing customer; the Orb
backfills and their status.

Everything comes from the ledger's tables (``deliveries``, ``day_counts``, ``findings``, ``backfills``)
through the ``Ledger``'s read methods, which own the SQL (PostgreSQL and SQLite alike); this module
only groups and formats their rows. Nothing here writes, and nothing here reads the warehouse: a
page view must not start a scan of a warehouse that bills by the byte, so the warehouse side is what
the sweep stored (``usage_billing.delivery.sweep``). Every value that reaches the page is escaped:
customer ids, event names and reasons come from warehouse rows anyone can write.
"""

from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

from usage_billing.ledger import DELIVERED, HELD, LOST, QUEUED, REJECTED, Ledger, generic_reason

#: Examples shown per rejection or hold reason.
EXAMPLES = 3
#: Customer rows shown per destination (the busiest first); the filter finds any other.
MAX_CUSTOMERS = 200
#: Event names listed per customer (the most frequent first).
MAX_EVENT_NAMES = 10

# Reconciliation's finding kinds (usage_billing.reconcile.compare), not imported: the view must not
# pull in the delivery core. The lost ones are healed once re-sending delivered them again.
FOUND_LOST, UNKNOWN_TO_LEDGER, NOT_DELIVERED = "missing_in_destination", "unknown_to_ledger", "not_delivered"

# Held because the destination has no such customer: the hold's reason names the customer
# (usage_billing.delivery.sending). Rows rejected or held before Rejection carried the customer have
# no customer_id in the ledger; for those holds the reason is all there is.
_HELD_CUSTOMER = re.compile(r"customer (['\"])(?P<customer>.*?)\1 does not exist in ")


@dataclass
class DayRow:
    """One day x destination of the billing table."""

    day: str
    destination: str
    # The sweep's latest count of the day (None: not counted yet); missing = warehouse - delivered -
    # rejected - held as the sweep counted them (sweep.DayCounts.missing).
    warehouse: int | None = None
    missing: int | None = None
    counted: str = "not counted yet"
    delivered: int = 0
    via_backfills: int = 0
    rejected: int = 0
    held: int = 0
    lost_now: int = 0  # the ledger's rows still marked lost: to be re-sent
    queued_now: int = 0  # past the grace period, waiting for their run's Orb backfill
    found_lost: int = 0
    found_lost_healed: int = 0
    unknown_to_ledger: int = 0
    not_delivered: int = 0  # warehouse events the ledger has neither delivered nor rejected, as last reconciled


@dataclass
class ReasonRow:
    """One rejection (or hold) reason of a destination, with its count and a few examples."""

    destination: str
    reason: str
    count: int
    examples: list[dict] = field(default_factory=list)


@dataclass
class FindingRow:
    """One kind of reconciliation finding of a destination: how many, how many healed, an example."""

    destination: str
    kind: str
    findings: int = 0
    events: int = 0
    healed: int = 0
    last_hour: str = ""
    detail: str = ""


@dataclass
class CustomerRow:
    """One billing customer of a destination: what was delivered for it, and what was not."""

    destination: str
    customer_id: str
    delivered: int = 0
    event_names: list[tuple[str, int]] = field(default_factory=list)
    last_delivery: str = ""
    rejected: int = 0
    held: int = 0


@dataclass
class BillingSummary:
    days: list[DayRow]
    reasons: list[ReasonRow]
    backfills: list[dict]
    held: list[ReasonRow] = field(default_factory=list)
    findings: list[FindingRow] = field(default_factory=list)
    customers: list[CustomerRow] = field(default_factory=list)
    customer_filter: str | None = None
    customers_cut: dict[str, int] = field(default_factory=dict)  # destination -> rows left out


def _day(value: Any) -> str:
    """``date(...)`` comes back as a date (PostgreSQL) or a string (SQLite)."""
    if isinstance(value, datetime) and value.tzinfo:
        value = value.astimezone(UTC)
    if isinstance(value, datetime | date):
        return value.isoformat()[:10]
    return str(value)[:10] if value else "(no timestamp)"


def _time(value: Any) -> str:
    """A timestamp as 'YYYY-MM-DD HH:MM:SS' UTC (SQLite gives the stored UTC text)."""
    if isinstance(value, datetime):
        value = value.astimezone(UTC) if value.tzinfo else value
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)[:19] if value else ""


def held_customer(reason: str | None) -> str | None:
    """The customer a hold names ("customer 'acme' does not exist in orb"), if it names one."""
    match = _HELD_CUSTOMER.search(reason or "")
    return match.group("customer") if match else None


def summarize(ledger: Ledger, customer: str | None = None) -> BillingSummary:
    """The Billing view's numbers, from the ledger's tables; ``customer`` limits the per-customer
    table to that customer id (exact match), the rest of the page is unchanged."""
    customer = customer or None
    if not ledger.has_table("deliveries"):
        return BillingSummary([], [], [], customer_filter=customer)
    days: dict[tuple[str, str], DayRow] = {}

    def day_row(day: Any, destination: str) -> DayRow:
        key = (_day(day), destination)
        return days.setdefault(key, DayRow(*key))

    _count_days(ledger, day_row)
    if ledger.has_table("day_counts"):
        _swept_days(ledger, day_row)
    reasons, held, not_delivered = _rejections_and_holds(ledger, customer)
    findings = _findings(ledger, day_row) if ledger.has_table("findings") else []
    customers, cut = _customers(ledger, customer, not_delivered)
    backfills = ledger.backfill_records() if ledger.has_table("backfills") else []
    return BillingSummary(sorted(days.values(), key=lambda r: (r.day, r.destination)), reasons, backfills, held,
                          findings, customers, customer, cut)


def _count_days(ledger: Ledger, day_row) -> None:
    for row in ledger.counts_per_day():
        entry, n = day_row(row["day"], row["destination"]), row["n"]
        if row["status"] == DELIVERED:
            entry.delivered += n
            if row["backfill"]:
                entry.via_backfills += n
        elif row["status"] == REJECTED:
            entry.rejected += n
        elif row["status"] == HELD:
            entry.held += n
        elif row["status"] == LOST:
            entry.lost_now += n
        elif row["status"] == QUEUED:
            entry.queued_now += n


def _swept_days(ledger: Ledger, day_row) -> None:
    """The warehouse side of each day, as the daily sweep last counted it: a day whose events are all
    missing has no ledger row, and shows here only through its count."""
    for row in ledger.day_counts():
        entry = day_row(row["day"], row["destination"])
        entry.warehouse = row["warehouse"]
        entry.missing = row["warehouse"] - row["delivered"] - row["rejected"] - row["held"]
        entry.counted = f"{_time(row['counted_at'])} by the sweep"


def _rejections_and_holds(ledger: Ledger, customer: str | None) -> tuple[list[ReasonRow], list[ReasonRow], Counter]:
    """Rejected and held events by reason (row ids stripped, so one reason groups many rows), and
    per (destination, customer, status) where the customer is known: from the row, or named by the hold."""
    counts: Counter = Counter()
    examples: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    per_customer: Counter = Counter()
    for row in ledger.rejected_and_held():
        key = (row["status"], row["destination"], generic_reason(row["reason"]))
        counts[key] += 1
        if len(examples[key]) < EXAMPLES:
            examples[key].append({"message_id": row["message_id"], "event_table": row["event_table"],
                                  "day": _day(row["event_timestamp"]), "attempts": row["attempts"]})
        who = row["customer_id"] or held_customer(row["reason"])
        if who is not None and customer in (None, who):
            per_customer[(row["destination"], who, row["status"])] += 1
    ordered = sorted(counts.items(), key=lambda item: (item[0][1], -item[1], item[0][2]))
    grouped = {status: [ReasonRow(destination, reason, count, examples[(s, destination, reason)])
                        for (s, destination, reason), count in ordered if s == status]
               for status in (REJECTED, HELD)}
    return grouped[REJECTED], grouped[HELD], per_customer


def _findings(ledger: Ledger, day_row) -> list[FindingRow]:
    """Reconciliation's findings per day (of the hour they are about) and per destination x kind.

    Every reconciliation of an hour records what it finds again, so a finding about one event (it has
    a key) counts once however often it was found, and a count about an hour counts as the latest
    reconciliation of that hour found it. Findings are exceptions: few rows, aggregated here."""
    latest: dict[tuple, dict] = {}
    for row in ledger.findings():
        key = row["idempotency_key"]
        what = key if key is not None else _time(row["hour"])
        latest[(row["destination"], row["kind"], key is not None, what)] = row
    kinds: dict[tuple[str, str], FindingRow] = {}
    for row in latest.values():
        events, healed = int(row["events"] or 0), row["healed_at"] is not None
        destination, found = row["destination"], row["kind"]
        entry = day_row(_day(row["hour"]), destination)
        if found == FOUND_LOST:
            entry.found_lost += events
            entry.found_lost_healed += events if healed else 0
        elif found == UNKNOWN_TO_LEDGER:
            entry.unknown_to_ledger += events
        elif found == NOT_DELIVERED:
            entry.not_delivered += events
        kind = kinds.setdefault((destination, found), FindingRow(destination, found))
        kind.findings += 1
        kind.events += events
        kind.healed += events if healed else 0
        kind.last_hour = max(kind.last_hour, _time(row["hour"]))
        kind.detail = kind.detail or (row["detail"] or "")
    return [kinds[key] for key in sorted(kinds)]


def _customers(ledger: Ledger, customer: str | None, not_delivered: Counter
               ) -> tuple[list[CustomerRow], dict[str, int]]:
    """One row per (destination, customer): delivered events, their event names, the last delivery,
    and the rejected / held events where the customer is known."""
    rows: dict[tuple[str, str], CustomerRow] = {}
    for row in ledger.delivered_per_customer(customer):
        rows[(row["destination"], row["customer_id"])] = CustomerRow(row["destination"], row["customer_id"], row["n"],
                                                                     last_delivery=_time(row["last"]))
    for row in ledger.delivered_event_names(customer):
        rows[(row["destination"], row["customer_id"])].event_names.append((row["event_name"] or "(no name)",
                                                                            row["n"]))
    for (destination, who, status), n in not_delivered.items():
        entry = rows.setdefault((destination, who), CustomerRow(destination, who))
        if status == REJECTED:
            entry.rejected += n
        else:
            entry.held += n
    ordered = sorted(rows.values(), key=lambda r: (r.destination, -r.delivered, -(r.rejected + r.held),
                                                   r.customer_id))
    shown: list[CustomerRow] = []
    cut: Counter = Counter()
    per_destination: Counter = Counter()
    for entry in ordered:
        entry.event_names.sort(key=lambda item: (-item[1], item[0]))
        per_destination[entry.destination] += 1
        if per_destination[entry.destination] > MAX_CUSTOMERS:
            cut[entry.destination] += 1
        else:
            shown.append(entry)
    return shown, dict(cut)


# ------------------------------------------------------------------------------------------ HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1a202c; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; } h3 { font-size: 1rem; }
table { border-collapse: collapse; margin-top: .5rem; }
th, td { border-bottom: 1px solid #e2e8f0; padding: .35rem .8rem; text-align: left; font-size: .9rem; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f7fafc; } .muted { color: #718096; font-size: .85rem; } code { font-size: .8rem; }
"""


def _e(value: Any) -> str:
    """Escaped for text and for single- or double-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def replay_dag(destination: str) -> str:
    return f"segment_to_{destination}_replay_rejected"


def _examples(row: ReasonRow) -> str:
    return "<br>".join(f"<code>{_e(x['message_id'])}</code> {_e(x['event_table'])} {_e(x['day'])} "
                       f"x{_e(x['attempts'])}" for x in row.examples)


_DAY_COLUMNS = (("warehouse", "warehouse", "in the warehouse"), ("delivered", "delivered", "delivered"),
                ("backfills", "via_backfills", "of which through backfills"),
                ("rejected", "rejected", "rejected"), ("held", "held", "held"),
                ("queued", "queued_now", "queued for a backfill"), ("missing", "missing", "missing"),
                ("counted", "counted", "warehouse counted (UTC)"),
                ("lost-now", "lost_now", "lost, to re-send"), ("found-lost", "found_lost", "found lost"),
                ("found-lost-healed", "found_lost_healed", "of which healed"),
                ("unknown", "unknown_to_ledger", "unknown to the ledger"),
                ("not-delivered", "not_delivered", "not delivered, as reconciled"))


def _day_cell(row: DayRow, testid: str, name: str) -> str:
    value = getattr(row, name)
    kind = " class='n'" if not isinstance(value, str) else ""
    return f"<td{kind} data-testid='{testid}-{_e(row.destination)}-{_e(row.day)}'>{_e(value)}</td>"


def render(summary: BillingSummary, base_url: str = "") -> str:
    """The view as one HTML page; numbers carry ``data-testid`` attributes (tests, scraping)."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Billing</title><style>{_STYLE}</style>"
           "</head><body><h1>Billing: what the ledger says was delivered</h1>",
           "<p class='muted'>Days are the events' own timestamps (UTC), the day they are billed for. "
           "Delivered counts include events sent through Orb backfills. Held events wait for their time or "
           "their customer and are delivered by a later run; found lost and unknown to the ledger are what "
           "reconciliation found (lost events are re-sent: healed once delivered again).</p>",
           "<p class='muted'>In the warehouse and missing are the daily completeness sweep's latest count of the "
           "day (this page never queries the warehouse): the day's events in the configured event tables, "
           "rejected ones included, and of those the ones neither delivered, rejected nor held when the sweep "
           "counted them, after it delivered what it found. "
           "<em>Not counted yet</em>: no sweep has seen the whole day yet (today, or a day older than the "
           "sweep's horizon when it first ran).</p>"]
    out.append("<h2>Per day and destination</h2>")
    if not summary.days:
        out.append("<p>No delivery yet: the ledger is empty. Backfill a DAG from its Trigger button.</p>")
    else:
        out.append("<table id='days'><tr><th>day</th><th>destination</th>"
                   + "".join(f"<th>{title}</th>" for _, _, title in _DAY_COLUMNS) + "</tr>")
        for row in summary.days:
            out.append(f"<tr><td>{_e(row.day)}</td><td>{_e(row.destination)}</td>"
                       + "".join(_day_cell(row, testid, name) for testid, name, _ in _DAY_COLUMNS) + "</tr>")
        out.append("</table>")
    out.extend(_render_customers(summary))
    out.append("<h2>Rejections by reason</h2>")
    if not summary.reasons:
        out.append("<p>No rejected event.</p>")
    else:
        out.append("<table id='reasons'><tr><th>destination</th><th>reason</th><th>events</th><th>examples "
                   "(message id, table, day, attempts)</th><th>replay</th></tr>")
        for number, row in enumerate(summary.reasons):
            link = f"{base_url}/dags/{replay_dag(row.destination)}"
            out.append(f"<tr><td>{_e(row.destination)}</td><td>{_e(row.reason)}</td>"
                       f"<td class='n' data-testid='reason-count-{number}'>{row.count}</td><td>{_examples(row)}</td>"
                       f"<td><a target='_top' href='{_e(link)}'>replay in {_e(replay_dag(row.destination))}</a>"
                       f"<br><span class='muted'>Trigger, with Reason contains: the reason's text</span></td></tr>")
        out.append("</table>")
    out.append("<h2>Held events by reason</h2>")
    if not summary.held:
        out.append("<p>No held event.</p>")
    else:
        out.append("<table id='held'><tr><th>destination</th><th>reason</th><th>events</th><th>examples "
                   "(message id, table, day, attempts)</th></tr>")
        for number, row in enumerate(summary.held):
            out.append(f"<tr><td>{_e(row.destination)}</td><td>{_e(row.reason)}</td>"
                       f"<td class='n' data-testid='held-count-{number}'>{row.count}</td>"
                       f"<td>{_examples(row)}</td></tr>")
        out.append("</table><p class='muted'>Each delivery run sends the held events that are due; nothing to "
                   "do unless a customer is missing from the destination.</p>")
    out.append("<h2>Reconciliation findings</h2>")
    if not summary.findings:
        out.append("<p>No finding: reconciliation has not run or found nothing.</p>")
    else:
        out.append("<table id='findings'><tr><th>destination</th><th>finding</th><th>findings</th><th>events</th>"
                   "<th>healed</th><th>latest hour</th><th>what it means</th></tr>")
        for row in summary.findings:
            cell = _e(f"{row.destination}-{row.kind}")
            out.append(f"<tr><td>{_e(row.destination)}</td><td>{_e(row.kind)}</td>"
                       f"<td class='n'>{row.findings}</td><td class='n' data-testid='finding-events-{cell}'>"
                       f"{row.events}</td><td class='n' data-testid='finding-healed-{cell}'>{row.healed}</td>"
                       f"<td>{_e(row.last_hour)}</td><td>{_e(row.detail)}</td></tr>")
        out.append("</table>")
    out.extend(_render_backfills(summary))
    out.append("</body></html>")
    return "\n".join(out)


def _render_customers(summary: BillingSummary) -> list[str]:
    out = ["<h2>Per customer</h2>",
           "<form id='customer-filter' method='get' action=''><label>Customer id "
           f"<input name='customer' value='{_e(summary.customer_filter)}'></label> <button>Filter</button>"
           + (" <a href='?'>all customers</a>" if summary.customer_filter else "") + "</form>",
           "<p class='muted'>The billing customer of each event (recorded since ledger migration 0002). "
           "Rejected and held events count for their customer where the ledger has it (on older rows only a "
           "hold for a customer the destination lacks names it); an event rejected for having no customer id "
           "counts for none.</p>"]
    if not summary.customers:
        if summary.customer_filter:
            out.append(f"<p>No event of customer <code>{_e(summary.customer_filter)}</code> in the ledger.</p>")
        else:
            out.append("<p>No event with a known customer yet.</p>")
        return out
    by_destination: dict[str, list[CustomerRow]] = defaultdict(list)
    for row in summary.customers:
        by_destination[row.destination].append(row)
    for destination, rows in by_destination.items():
        out.append(f"<h3>{_e(destination)}</h3><table id='customers-{_e(destination)}'><tr><th>customer</th>"
                   "<th>events delivered</th><th>event names (events)</th><th>last delivery (UTC)</th>"
                   "<th>rejected</th><th>held</th></tr>")
        for row in rows:
            cell = _e(f"{row.destination}-{row.customer_id}")
            names = ", ".join(f"{_e(name)} ({n})" for name, n in row.event_names[:MAX_EVENT_NAMES])
            if len(row.event_names) > MAX_EVENT_NAMES:
                names += f", and {len(row.event_names) - MAX_EVENT_NAMES} more"
            link = f"?customer={quote(row.customer_id, safe='')}"
            out.append(f"<tr><td><a href='{_e(link)}'>{_e(row.customer_id)}</a></td>"
                       f"<td class='n' data-testid='customer-delivered-{cell}'>{row.delivered}</td>"
                       f"<td>{names}</td><td>{_e(row.last_delivery)}</td>"
                       f"<td class='n' data-testid='customer-rejected-{cell}'>{row.rejected}</td>"
                       f"<td class='n' data-testid='customer-held-{cell}'>{row.held}</td></tr>")
        out.append("</table>")
        if summary.customers_cut.get(destination):
            out.append(f"<p class='muted'>And {summary.customers_cut[destination]} more customers: "
                       "filter by customer id to see one.</p>")
    return out


def _render_backfills(summary: BillingSummary) -> list[str]:
    out = ["<h2>Orb backfills</h2>"]
    if not summary.backfills:
        return [*out, "<p>No Orb backfill yet.</p>"]
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
    return out
