"""Reconciliation end to end without a server: an in-memory warehouse, a SQLite ledger and a fake
destination with a read API. Each test says what a difference between the three looks like, and what
reconciliation does about it."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.unit.delivery.conftest import NOW, events, settings
from usage_billing.delivery import DeliveryJob, deliver_window
from usage_billing.delivery.runs import LOADED_SINCE_MARGIN
from usage_billing.destinations import get_destination
from usage_billing.ledger import Ledger, RunRef
from usage_billing.reconcile import Checking, reconcile
from usage_billing.reconcile.compare import DISAGREES, SAMPLE
from usage_billing.reconcile.fake import FakeReadingSender
from usage_billing.sources import Partition, Window
from usage_billing.sources.memory import MemorySource
from usage_billing.sources.postgres import create_engine

START = NOW - timedelta(hours=5)
HOUR = timedelta(hours=1)


@pytest.fixture
def ledger(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/ledger.db", ["usage_billing"])
    ledger = Ledger(engine, "usage_billing")
    ledger.create()
    yield ledger
    engine.dispose()


def job(ledger: Ledger, sender: FakeReadingSender, source: MemorySource, name: str = "orb",
        run: str = "run-1") -> DeliveryJob:
    config = settings(name)
    made = DeliveryJob.from_settings(config, get_destination(name, config), source, ledger, sender,
                                     RunRef("usage_billing_sweep", run))
    return dataclasses.replace(made, now=lambda: NOW)


def delivered_world(ledger: Ledger, name: str = "orb", start=START, count: int = 300):
    """``count`` events one minute apart from ``start`` (60 an hour), all delivered."""
    source = MemorySource({"api_call": events(count, start=start, step=timedelta(minutes=1))})
    sender = FakeReadingSender()
    deliver_window(job(ledger, sender, source, name), Partition("api_call"), Window(start - HOUR, NOW + HOUR))
    return source, sender


def run(ledger, sender, source, name="orb", run="rec-1", start=START, **options):
    return reconcile(job(ledger, sender, source, name, run), ["api_call"], start, NOW, Checking(**options))


def test_a_delivered_range_agrees_and_only_the_sample_is_searched(ledger):
    source, sender = delivered_world(ledger)
    report = run(ledger, sender, source, sample_hours=2)
    assert [(x.warehouse, x.ledger, x.destination) for x in report.lines] == [(60, 60, 60)] * 5
    assert [x.checked for x in report.lines].count(SAMPLE) == 2 and sender.searched == [60, 60]
    assert report.unresolved() == [] and ledger.findings("orb") == []


def test_an_event_the_destination_lost_is_found_by_hour_and_by_key_and_re_sent_under_its_key(ledger):
    source, sender = delivered_world(ledger)
    lost = "m00130"  # 07:00 + 130 minutes: the 09:00 hour
    sender.lose(lost)
    report = run(ledger, sender, source, sample_hours=0)
    (hour,) = report.checked_hours
    assert (hour.hour, hour.checked, hour.ledger, hour.destination) == (START + 2 * HOUR, DISAGREES, 60, 59)
    assert hour.lost == [lost] and hour.healed == [lost] and report.unresolved() == []
    assert lost in sender.held and sender.accepted_counts[lost] == 2, "sent again, once"
    assert ledger.status_of("orb", [lost]) == {lost: "delivered"}
    assert [h["status"] for h in ledger.history_of("orb", lost)] == ["delivered"], "the first delivery is kept"
    (finding,) = ledger.findings("orb")
    assert (finding["kind"], finding["idempotency_key"], finding["healed_by_run"]) == (
        "missing_in_destination", lost, "rec-1")
    again = run(ledger, sender, source, run="rec-2", sample_hours=0)
    assert again.checked_hours == [] and again.unresolved() == [] and len(ledger.findings("orb")) == 1


def test_an_event_lost_beyond_the_grace_period_is_re_sent_through_a_backfill(ledger):
    start = NOW - timedelta(days=2)
    source, sender = delivered_world(ledger, start=start, count=120)
    backfills = len(sender.backfills)
    sender.lose("m00005")
    report = run(ledger, sender, source, start=start, sample_hours=0)
    assert report.lost == 1 and report.healed == 1
    assert len(sender.backfills) == backfills + 1
    assert list(sender.in_backfill.values())[-1] == ["m00005"]


def test_an_event_the_ledger_lost_the_mark_of_is_reported_not_healed(ledger):
    source, sender = delivered_world(ledger)
    with ledger.engine.begin() as conn:
        conn.execute(sa.delete(ledger.table).where(ledger.table.c.idempotency_key == "m00061"))
    report = run(ledger, sender, source, sample_hours=0)
    (hour,) = report.checked_hours
    assert (hour.warehouse, hour.ledger, hour.destination) == (60, 59, 60)
    assert hour.unknown == ["m00061"] and hour.lost == [] and hour.unmatched == 0
    assert report.unresolved() == ["2026-11-23 08:00 1 events held by orb are not delivered per the ledger"]
    assert "m00061" in sender.held and ledger.status_of("orb", ["m00061"]) == {}, "nothing deleted, nothing marked"
    assert [(f["kind"], f["healed_at"]) for f in ledger.findings("orb")] == [("unknown_to_ledger", None)]


def test_events_another_system_ingested_show_as_a_count_no_key_explains(ledger):
    source, sender = delivered_world(ledger)
    sender.foreign["other-1"] = {"timestamp": "2026-11-23T10:15:00.000Z"}
    report = run(ledger, sender, source, sample_hours=0)
    (hour,) = report.checked_hours
    assert hour.unmatched == 1 and "another system ingesting" in report.render()
    assert [(f["kind"], f["events"]) for f in ledger.findings("orb")] == [("unmatched_count", 1)]


def test_without_the_volume_every_hour_is_searched_and_the_loss_still_found(ledger):
    source, sender = delivered_world(ledger)
    sender.foreign["other-1"] = {"timestamp": "2026-11-23T10:15:00.000Z"}  # invisible without the counts
    sender.lose("m00200")
    report = run(ledger, sender, source, compare_volume=False)
    assert len(report.checked_hours) == 5 and sender.searched == [60] * 5
    assert report.lost == report.healed == 1 and report.unresolved() == []
    assert all(x.destination is None for x in report.lines) and "compare_volume: false" in report.render()


def test_kable_reconciles_the_warehouse_against_the_ledger_only(ledger):
    source, sender = delivered_world(ledger, name="kable")
    sender.lose("m00010")  # invisible: Kable cannot be asked what it holds
    with ledger.engine.begin() as conn:
        conn.execute(sa.delete(ledger.table).where(ledger.table.c.idempotency_key == "m00250"))
    report = run(ledger, sender, source, name="kable")
    assert sender.searched == [] and report.checked_hours == []
    assert "kable has no read API" in report.render()
    assert report.unresolved() == ["2026-11-23 11:00 1 warehouse events are not delivered"]


def test_a_sample_is_drawn_by_the_given_generator(ledger):
    source, sender = delivered_world(ledger)
    first = run(ledger, sender, source, sample_hours=1, rng=random.Random(3))
    second = run(ledger, sender, source, run="rec-2", sample_hours=1, rng=random.Random(3))
    assert [x.hour for x in first.checked_hours] == [x.hour for x in second.checked_hours]


def reads_of(source: MemorySource) -> list:
    requests, read = [], source.read
    source.read = lambda request: requests.append(request) or read(request)
    return requests


def test_a_lost_event_that_was_queued_is_read_back_from_its_recorded_load(ledger):
    """Healing reads lost events by id: pruned on the loaded-at column where the ledger recorded a load
    (an event once queued, held or rejected), unbounded otherwise, and the report says which."""
    start = NOW - timedelta(days=2)
    source, sender = delivered_world(ledger, start=start, count=120)  # past the grace period: queued first
    sender.lose("m00005")
    requests = reads_of(source)
    report = run(ledger, sender, source, start=start, sample_hours=0)
    assert report.healed == 1
    by_id = [r for r in requests if r.ids is not None]
    loaded = source.tables["api_call"].set_index("id").loc["m00005", "received_at"]
    # Read back to heal it, then (still past the grace period, queued again) into its backfill.
    assert [(r.ids, r.loaded_since) for r in by_id] == [(["m00005"], loaded - LOADED_SINCE_MARGIN)] * 2
    assert any("read from rows loaded since" in note for note in report.notes)


def test_a_lost_event_delivered_live_is_read_back_unbounded_and_the_report_says_so(ledger):
    source, sender = delivered_world(ledger)
    sender.lose("m00130")
    requests = reads_of(source)
    report = run(ledger, sender, source, sample_hours=0)
    assert report.healed == 1
    (by_id,) = [r for r in requests if r.ids is not None]
    assert by_id.loaded_since is None, "a delivery records no loaded-at: nothing sound bounds the read"
    assert "api_call: 1 of 1 chosen events have no loaded-at in the ledger" in report.render()
