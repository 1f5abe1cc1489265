"""The Billing view's numbers and page, on a small SQLite ledger written through the Ledger's own API."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from billing_airflow.ui.billing_view import held_customer, render, summarize
from usage_billing.destinations.base import Rejection
from usage_billing.ledger import HELD, QUEUED, EventRefs, Ledger, Route, RunRef
from usage_billing.sources.postgres import create_engine

DAY1, DAY2 = datetime(2026, 11, 23, 10, tzinfo=UTC), datetime(2026, 11, 24, 23, 59, tzinfo=UTC)
NOW = datetime(2026, 11, 25, 8, tzinfo=UTC)
DAY0, COUNTED = date(2026, 11, 22), datetime(2026, 11, 26, 3, 31, 5, tzinfo=UTC)
RUN = RunRef("segment_to_orb", "manual__1")
HOSTILE = "<script>alert('x')</script>&\"evil"


def deliver(ledger: Ledger, destination: str, rows: list[tuple[str, datetime, str, str]], route: Route = Route(),
            now: datetime = NOW) -> None:
    """Mark ``(key, timestamp, customer, event name)`` rows delivered, as the delivery core does."""
    keys = [key for key, *_ in rows]
    ledger.mark_delivered(destination, RUN, EventRefs(
        keys=keys, message_ids=keys, tables=["api_call"] * len(rows), timestamps=[t for _, t, _, _ in rows],
        customer_ids=[c for _, _, c, _ in rows], event_names=[n for _, _, _, n in rows]), now, route)


@pytest.fixture
def ledger(tmp_path):
    """orb, day 1: d0..d2 for acme (d0 later found lost and not yet re-sent, d1 found lost and healed),
    e0 for a customer id full of HTML; day 2: b1 for acme through backfill bf_1, 4 rejections without a
    customer id and 1 of acme's, 2 events held for customer 'ghost' Orb does not have (h0 as the core
    writes it now, h1 as an older row: named only by its reason), 1 of acme's held for its timestamp.
    kable: k1 for acme. The sweep counted orb's day 1 twice (the later count stands) and the day
    before it, whose 5 warehouse events are all missing; it has not counted day 2."""
    engine = create_engine(f"sqlite:///{tmp_path / 'wh.db'}", ["usage_billing"])
    ledger = Ledger(engine, "usage_billing")
    ledger.create()
    deliver(ledger, "orb", [("d0", DAY1, "acme", "api_call"), ("d1", DAY1, "acme", "api_call"),
                            ("d2", DAY1, "acme", "login"), ("e0", DAY1, HOSTILE, "<b>bold</b>")])
    deliver(ledger, "orb", [("b1", DAY2, "acme", "api_call")], Route("backfill", "bf_1"))
    deliver(ledger, "kable", [("k1", DAY1, "acme", "api_call")])
    ledger.mark_rejected("orb", RUN, [
        Rejection(f"r{i}", f"r{i}", "api_call", f"api_call row id=r{i}: no external customer ID: userId is empty",
                  DAY2) for i in range(4)] + [
        Rejection("x1", "x1", "api_call", "amount is not a number", DAY1, customer="acme")], NOW)
    ledger.mark_rejected("orb", RUN, [
        Rejection(f"h{i}", f"h{i}", "api_call", f"api_call row id=h{i}: customer 'ghost' does not exist in orb: "
                  "held until it does", DAY2, customer="ghost" if i == 0 else None) for i in range(2)] + [
        Rejection("f1", "f1", "api_call", "api_call row id=f1: timestamp 2026-12-30 is in the future: held until due",
                  DAY2, customer="acme")], NOW, status=HELD)
    # Reconciliation: d0 and d1 lost by Orb; d1 re-sent and healed, d0 not yet; one Orb event unknown.
    ledger.mark_lost("orb", ["d0", "d1"], RUN, NOW, reason="reconciliation: delivered, but orb does not hold it")
    ledger.record_findings("orb", [
        {"kind": "missing_in_destination", "hour": DAY1.replace(minute=0), "idempotency_key": key,
         "detail": "delivered per the ledger, not found by orb's search for the hour"} for key in ("d0", "d1")] + [
        {"kind": "unknown_to_ledger", "hour": DAY1.replace(minute=0), "idempotency_key": "zz",
         "detail": "held by orb, not delivered per the ledger"}], RUN, NOW)
    # Reconciled again later: the same unknown event (counted once) and the hour's missing count, now 2 (not 5).
    hour = DAY1.replace(minute=0)
    ledger.record_findings("orb", [{"kind": "not_delivered", "hour": hour, "events": 5}], RUN, NOW)
    ledger.record_findings("orb", [{"kind": "unknown_to_ledger", "hour": hour, "idempotency_key": "zz"},
                                   {"kind": "not_delivered", "hour": hour, "events": 2}], RUN, NOW + timedelta(days=1))
    later = NOW + timedelta(hours=1)
    ledger.mark_delivered("orb", RUN, EventRefs(["d1"], ["d1"], ["api_call"], [DAY1]), later)
    ledger.heal_findings("orb", "missing_in_destination", ["d1"], RUN, later)
    # Past the grace period, waiting for the run's backfill task.
    ledger.mark_rejected("orb", RUN, [Rejection(key="q1", message_id="q1", table="api_call", event_timestamp=DAY1,
                                                reason="api_call row id=q1: older than orb's grace period: queued")],
                         NOW, QUEUED)
    sweep = RunRef("usage_billing_sweep", "scheduled__1")
    ledger.record_day_counts("orb", {DAY1.date(): {"warehouse": 9, "delivered": 2, "rejected": 1, "held": 0},
                                     DAY0: {"warehouse": 5, "delivered": 0, "rejected": 0, "held": 0}}, sweep, NOW)
    ledger.record_day_counts("orb", {DAY1.date(): {"warehouse": 6, "delivered": 4, "rejected": 1, "held": 0}},
                             sweep, COUNTED)
    ledger.record_backfill("orb", {"id": "bf_1", "timeframe_start": "2026-11-24T00:00:00Z",
                                   "timeframe_end": "2026-11-25T00:00:00Z", "replace_existing_events": True,
                                   "status": "reflected"}, RUN, events_sent=1)
    yield ledger
    engine.dispose()


def test_days_destinations_and_backfills_add_up(ledger):
    summary = summarize(ledger)
    table = {(r.day, r.destination): (r.delivered, r.via_backfills, r.rejected, r.held) for r in summary.days}
    assert table == {("2026-11-23", "orb"): (3, 0, 1, 0), ("2026-11-23", "kable"): (1, 0, 0, 0),
                     ("2026-11-24", "orb"): (1, 1, 4, 3), ("2026-11-22", "orb"): (0, 0, 0, 0)}
    assert [(b["backfill_id"], b["status"]) for b in summary.backfills] == [("bf_1", "reflected")]


def test_reconciliation_findings_count_lost_healed_unknown_and_missing_per_day_once(ledger):
    summary = summarize(ledger)
    [day1] = [r for r in summary.days if (r.day, r.destination) == ("2026-11-23", "orb")]
    assert (day1.lost_now, day1.found_lost, day1.found_lost_healed, day1.unknown_to_ledger, day1.not_delivered) == (
        1, 2, 1, 1, 2)
    assert day1.queued_now == 1 and "queued for a backfill" in render(summarize(ledger))
    kinds = {r.kind: (r.findings, r.events, r.healed) for r in summary.findings}
    assert kinds == {"missing_in_destination": (2, 2, 1), "unknown_to_ledger": (1, 1, 0), "not_delivered": (1, 2, 0)}


def test_the_warehouse_and_missing_columns_are_the_sweeps_latest_count_of_each_day(ledger):
    days = {(r.day, r.destination): (r.warehouse, r.missing, r.counted) for r in summarize(ledger).days}
    assert days[("2026-11-23", "orb")] == (6, 1, "2026-11-26 03:31:05 by the sweep"), "6 - 4 - 1 - 0, recounted"
    assert days[("2026-11-22", "orb")] == (5, 5, "2026-11-25 08:00:00 by the sweep"), "no ledger row: all missing"
    assert days[("2026-11-24", "orb")] == days[("2026-11-23", "kable")] == (None, None, "not counted yet")
    page = render(summarize(ledger))
    assert "data-testid='warehouse-orb-2026-11-23'>6<" in page and "data-testid='missing-orb-2026-11-23'>1<" in page
    assert "data-testid='missing-orb-2026-11-22'>5<" in page
    assert "data-testid='warehouse-orb-2026-11-24'><" in page
    assert "data-testid='counted-orb-2026-11-24'>not counted yet<" in page


def test_rejections_are_grouped_by_reason_without_the_row_id_with_examples(ledger):
    reasons = summarize(ledger).reasons
    assert [(r.reason, r.count) for r in reasons] == [
        ("no external customer ID: userId is empty", 4), ("amount is not a number", 1)]
    assert [x["message_id"] for x in reasons[0].examples] == ["r0", "r1", "r2"]


def test_held_events_are_grouped_by_reason_apart_from_rejections(ledger):
    held = summarize(ledger).held
    assert [(r.reason, r.count) for r in held] == [
        ("customer 'ghost' does not exist in orb: held until it does", 2),
        ("timestamp 2026-12-30 is in the future: held until due", 1)]


def test_per_customer_rows_per_destination(ledger):
    rows = {(r.destination, r.customer_id): r for r in summarize(ledger).customers}
    assert set(rows) == {("orb", "acme"), ("orb", HOSTILE), ("orb", "ghost"), ("kable", "acme")}
    acme = rows[("orb", "acme")]
    # d0 is lost (waiting to be re-sent), so not counted as delivered; d1 was delivered again.
    assert (acme.delivered, acme.event_names, acme.rejected, acme.held) == (3, [("api_call", 2), ("login", 1)], 1, 1)
    assert acme.last_delivery == "2026-11-25 09:00:00"
    assert (rows[("orb", "ghost")].delivered, rows[("orb", "ghost")].held) == (0, 2), "h1 named by its reason"
    assert rows[("kable", "acme")].delivered == 1


@pytest.mark.parametrize(("customer", "expected"), [
    ("acme", {("orb", "acme"), ("kable", "acme")}),
    ("ghost", {("orb", "ghost")}),
    ("nobody", set()),
], ids=["delivered-to-both", "only-held", "unknown"])
def test_the_customer_filter_keeps_only_that_customer(ledger, customer, expected):
    summary = summarize(ledger, customer=customer)
    assert {(r.destination, r.customer_id) for r in summary.customers} == expected
    assert len(summary.days) == 4, "the filter is for the per-customer table only"


def test_the_page_shows_the_customer_rows_and_the_filter(ledger):
    page = render(summarize(ledger, customer="acme"))
    assert "data-testid='customer-delivered-orb-acme'>3<" in page
    assert "data-testid='customer-delivered-kable-acme'>1<" in page
    assert "data-testid='customer-rejected-orb-acme'>1<" in page and "data-testid='customer-held-orb-acme'>1<" in page
    assert "name='customer' value='acme'" in page and "all customers" in page
    assert "No event of customer <code>nobody</code>" in render(summarize(ledger, customer="nobody"))


def test_a_hostile_customer_id_and_event_name_are_escaped(ledger):
    page = render(summarize(ledger))
    assert "<script>" not in page and "<b>bold</b>" not in page
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;evil"
    assert f"data-testid='customer-delivered-orb-{escaped}'>1<" in page
    assert "&lt;b&gt;bold&lt;/b&gt; (1)" in page
    assert "href='?customer=%3Cscript%3Ealert%28%27x%27%29%3C%2Fscript%3E%26%22evil'" in page
    filtered = render(summarize(ledger, customer=HOSTILE))
    assert "<script>" not in filtered and f"value='{escaped}'" in filtered


@pytest.mark.parametrize(("reason", "customer"), [
    ("api_call row id=h0: customer 'ghost' does not exist in orb: held until it does", "ghost"),
    ("api_call row id=h0: customer \"it's\" does not exist in kable: held until it does", "it's"),
    ("api_call row id=f1: timestamp 2026-12-30 is in the future: held until due", None),
    (None, None),
], ids=["named", "quote-in-id", "future-stamped", "no-reason"])
def test_a_hold_names_its_customer(reason, customer):
    assert held_customer(reason) == customer


def test_the_page_links_each_reason_to_the_replay_dag(ledger):
    page = render(summarize(ledger))
    assert "data-testid='delivered-orb-2026-11-23'>3<" in page
    assert "data-testid='held-orb-2026-11-24'>3<" in page
    assert "data-testid='found-lost-healed-orb-2026-11-23'>1<" in page
    assert "data-testid='not-delivered-orb-2026-11-23'>2<" in page
    assert "href='/dags/segment_to_orb_replay_rejected'" in page and "target='_top'" in page


def test_an_empty_ledger_says_so(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}", ["usage_billing"])
    assert "No delivery yet" in render(summarize(Ledger(engine, "usage_billing")))
    engine.dispose()
