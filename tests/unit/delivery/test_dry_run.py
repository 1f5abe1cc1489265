"""A dry run goes through the real core, sends nothing and writes nothing, and says what it would do."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from tests.unit.delivery.conftest import NOW, PARTITION, WINDOW, events
from usage_billing.delivery import deliver_window
from usage_billing.delivery.dry_run import dry_run
from usage_billing.reconcile.fake import FakeReadingSender
from usage_billing.sources import Window


def ledger_rows(core) -> dict:
    return core.ledger.counts()


def test_a_dry_run_sends_nothing_writes_nothing_and_counts_per_day_customer_and_event(core):
    frame = core.source.tables["api_call"].copy()
    frame.loc[frame.index[:4], "user_id"] = pd.NA
    core.source.tables["api_call"] = frame
    report = dry_run(core.job(), ["api_call"], WINDOW)
    assert core.sender.requests == 0 and not core.sender.held, "nothing sent"
    assert ledger_rows(core) == {}, "nothing written"
    assert sum(report.would_send.values()) == 296 and report.delivery.rejected == 4
    assert report.would_send[(f"{NOW:%Y-%m-%d}", "cus_5", "API Call")] == 10
    rendered = report.render()
    assert "DRY RUN (deliver)" in rendered and "would reject      4" in rendered and "no external customer ID" in rendered

    real = deliver_window(core.job(), PARTITION, WINDOW)
    assert real.accepted == sum(report.would_send.values()), "the preview matches what the run then does"


def test_a_dry_run_skips_what_is_already_delivered(core):
    deliver_window(core.job(), PARTITION, WINDOW)
    requests, rows = core.sender.requests, ledger_rows(core)
    report = dry_run(core.job("dry"), ["api_call"], WINDOW)
    assert sum(report.would_send.values()) == 0 and report.delivery.already_delivered == 300
    assert core.sender.requests == requests and ledger_rows(core) == rows


def test_a_dry_run_shows_the_backfills_late_events_would_need(core):
    old = events(30, start=NOW - timedelta(days=2, hours=2), step=timedelta(hours=1), prefix="old")
    old["received_at"] = NOW - timedelta(minutes=30)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    report = dry_run(core.job(), ["api_call"], WINDOW)
    assert report.in_backfills == 30 and report.backfills == len({s.date() for s in old["timestamp"]})
    assert not core.sender.backfills, "no backfill was created"


def test_a_replace_dry_run_compares_each_hour_with_what_orb_holds_now(core):
    core.sender = FakeReadingSender()
    deliver_window(core.job(), PARTITION, WINDOW)
    gone = sorted(core.sender.held)[:3]
    core.sender.lose(*gone)  # Orb holds three fewer than the warehouse in that hour
    period = Window(NOW - timedelta(hours=1), NOW)
    requests = core.sender.requests
    report = dry_run(core.job("dry"), ["api_call"], period, replace=True)
    assert core.sender.requests == requests and report.mode == "replace"
    (_, (now, after)), = [(h, c) for h, c in report.replace_change.items() if c[0] != c[1]]
    assert after - now == 3
    assert "replace would change" in report.render()
