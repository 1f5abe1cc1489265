"""The Billing view's numbers and page, on a small SQLite ledger written by hand."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from billing_airflow.ui.billing_view import render, summarize
from usage_billing.ledger import Ledger
from usage_billing.sources.postgres import create_engine

DAY1, DAY2 = datetime(2026, 11, 23, 10, tzinfo=UTC), datetime(2026, 11, 24, 23, 59, tzinfo=UTC)


@pytest.fixture
def ledger(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'wh.db'}", ["usage_billing"])
    ledger = Ledger(engine, "usage_billing")
    ledger.create()
    rows = [("orb", f"d{i}", "delivered", None, DAY1, None) for i in range(3)]
    rows += [("orb", "b1", "delivered", None, DAY2, "bf_1"), ("kable", "k1", "delivered", None, DAY1, None)]
    rows += [("orb", f"r{i}", "rejected", f"api_call row id=r{i}: no external customer ID: userId is empty", DAY2, None)
             for i in range(4)]
    rows += [("orb", "x1", "rejected", "amount is not a number", DAY1, None)]
    with engine.begin() as conn:
        conn.execute(ledger.table.insert(), [
            {"destination": d, "idempotency_key": k, "status": s, "reason": r, "event_timestamp": t, "backfill_id": b,
             "message_id": k, "event_table": "api_call", "attempts": 1} for d, k, s, r, t, b in rows])
        conn.execute(ledger.backfills.insert().values(
            destination="orb", backfill_id="bf_1", timeframe_start=DAY2, timeframe_end=DAY2,
            replace_existing_events=True, status="reflected", events_sent=1))
    yield ledger
    engine.dispose()


def test_days_destinations_and_backfills_add_up(ledger):
    summary = summarize(ledger)
    table = {(r.day, r.destination): (r.delivered, r.via_backfills, r.rejected) for r in summary.days}
    assert table == {("2026-11-23", "orb"): (3, 0, 1), ("2026-11-23", "kable"): (1, 0, 0),
                     ("2026-11-24", "orb"): (1, 1, 4)}
    assert [b["backfill_id"] for b in summary.backfills] == ["bf_1"]


def test_rejections_are_grouped_by_reason_without_the_row_id_with_examples(ledger):
    reasons = summarize(ledger).reasons
    assert [(r.reason, r.count) for r in reasons] == [
        ("no external customer ID: userId is empty", 4), ("amount is not a number", 1)]
    assert [x["message_id"] for x in reasons[0].examples] == ["r0", "r1", "r2"]


def test_the_page_links_each_reason_to_the_replay_dag(ledger):
    page = render(summarize(ledger))
    assert "data-testid='delivered-orb-2026-11-23'>3<" in page
    assert "href='/dags/segment_to_orb_replay_rejected'" in page and "target='_top'" in page


def test_an_empty_ledger_says_so(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}", ["usage_billing"])
    assert "No delivery yet" in render(summarize(Ledger(engine, "usage_billing")))
    engine.dispose()
