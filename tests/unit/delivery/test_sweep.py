"""The completeness sweep against an in-process destination: which event days it counts whole, and
that it stores those counts in the ledger for the Billing view."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from tests.unit.delivery.conftest import NOW, events
from usage_billing.delivery import sweep
from usage_billing.delivery.sweep import DayCounts, whole_days
from usage_billing.sources import Window


def at(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(("window", "days"), [
    (Window(at(16), at(23)), [date(2026, 11, d) for d in range(16, 23)]),
    (Window(at(16, 3, 30), at(23, 3, 30)), [date(2026, 11, d) for d in range(17, 23)]),
    (Window(at(16, 3, 30), at(23, 3, 30), timedelta(hours=4)), [date(2026, 11, d) for d in range(16, 23)]),
    (Window(at(22, 1), at(23, 1)), []),
], ids=["midnight-to-midnight", "the-default-0330-schedule-cuts-both-ends", "the-lookback-widens-the-scan",
        "shorter-than-a-whole-day"])
def test_the_sweep_counts_the_days_its_scan_holds_whole(window, days):
    assert whole_days(window) == days


def test_the_sweep_stores_its_final_count_of_every_whole_day_in_the_ledger(core):
    """Today's rows (not a whole day yet), rows of the 20th (5 without a customer: rejected), and rows
    of the 16th, the day the horizon starts inside: only the whole days in between are stored."""
    old = events(30, start=at(20, 9), step=timedelta(minutes=7), prefix="old")
    old.loc[old.index[:5], "user_id"] = pd.NA
    cut = events(4, start=at(16, 20), prefix="cut")
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old, cut], ignore_index=True)
    horizon = Window(NOW - timedelta(days=7), NOW)
    report = sweep(core.job("scheduled__sweep"), ["api_call"], horizon)

    stored = core.ledger.day_counts_table
    with core.ledger.engine.connect() as conn:
        rows = {row.day: row for row in conn.execute(sa.select(stored).where(stored.c.destination == "orb"))}
    assert sorted(rows) == report.recorded == [date(2026, 11, d) for d in range(17, 23)]
    assert {day: DayCounts(row.warehouse, row.delivered, row.rejected, row.held) for day, row in rows.items()} == {
        day: report.after.get(day, DayCounts()) for day in report.recorded}
    twentieth = rows[date(2026, 11, 20)]
    assert (twentieth.warehouse, twentieth.delivered, twentieth.rejected, twentieth.held) == (30, 25, 5, 0)
    assert rows[date(2026, 11, 18)].warehouse == 0, "a whole day without events counts zero"
    assert {(row.dag_id, row.run_id) for row in rows.values()} == {("segment_to_orb", "scheduled__sweep")}
    assert "event days 2026-11-17 .. 2026-11-22" in report.render()
