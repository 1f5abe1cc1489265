"""Late data and history (issue: Orb backfills past the grace period, replace mode, the sweep).

Against the Orb sandbox, which enforces the 12-hour grace period and implements Orb's backfill
endpoints with its overlap rule, on the real PostgreSQL.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.integration.conftest import make_world
from usage_billing.delivery import replace_window, sweep
from usage_billing.delivery.sweep import DayCounts
from usage_billing.destinations import get_destination
from usage_billing.sources import Window

DAYS = 10


@pytest.fixture
def history(pg_engine, schemas, monkeypatch):
    """Ten days of Segment data ending now: most of it older than Orb's grace period."""
    yield from make_world("orb", pg_engine, schemas, monkeypatch, events_per_hour=2, hours=DAYS * 24)


def windows(world, hours: int = 6) -> list[Window]:
    last = world.now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    first = last - timedelta(days=DAYS)
    return [Window(first + timedelta(hours=h), first + timedelta(hours=h + hours), timedelta(hours=6))
            for h in range(0, DAYS * 24, hours)]


def loaded_between(world, start, end, with_user: bool = True) -> set[str]:
    ids: set[str] = set()
    with world.engine.connect() as conn:
        for table in world.settings.source.events:
            rows = conn.execute(sa.text(
                f'SELECT id FROM "{world.schema}".{table} WHERE received_at >= :s AND received_at < :e '
                f"AND user_id IS {'NOT ' if with_user else ''}NULL"), {"s": start, "e": end})
            ids.update(r[0] for r in rows)
    return ids


def test_a_ten_day_backfill_across_the_grace_boundary_lands_every_event_once(history):
    world = history
    runs = windows(world)
    for number, window in enumerate(runs):
        world.deliver(run=f"backfill__{number}", window=window)
    expected = loaded_between(world, runs[0].scan_start, runs[-1].end)
    assert world.sandbox.accepted_keys() == expected
    assert len(world.sandbox.accepted()) == len(expected)
    assert not [r for r in world.ledger.rejected("orb") if "grace" in (r["reason"] or "")], "none rejected for age"
    backfills = world.sandbox.backfills()
    assert len(backfills) > DAYS // 2 and {b["status"] for b in backfills} == {"reflected"}
    assert {b["backfill_id"] for b in world.ledger.backfill_records("orb")} == {b["id"] for b in backfills}
    with world.engine.connect() as conn:
        modes = dict(conn.execute(sa.text(
            f'SELECT mode, count(*) FROM "{world.ledger.schema}".deliveries WHERE status = \'delivered\' '
            f"GROUP BY mode")).all())
    assert modes["backfill"] > modes.get("ingest", 0) > 0, modes

    requests, backfill_count = len(world.sandbox.requests), len(backfills)
    for number, window in enumerate(runs):  # the same backfill again, e.g. "All Runs" from the UI
        reports = world.deliver(run=f"again__{number}", window=window)
        assert sum(r.sent for r in reports) == 0
    assert len(world.sandbox.requests) == requests and len(world.sandbox.backfills()) == backfill_count


def test_two_overlapping_backfills_in_parallel_respect_orbs_overlap_rule(history):
    world = history
    everything = Window(world.now - timedelta(days=DAYS + 1), world.now + timedelta(hours=1))
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda n: world.deliver(run=f"parallel-{n}", window=everything, hook=world.hook()), range(3)))
    assert world.sandbox.accepted_keys() == world.deliverable_ids()
    assert world.sandbox.duplicates == 0
    assert {b["status"] for b in world.sandbox.backfills()} == {"reflected"}


def test_replace_mode_re_bills_a_period_with_a_changed_mapping(pg_engine, schemas, monkeypatch):
    for world in make_world("orb", pg_engine, schemas, monkeypatch, events_per_hour=20, hours=30):
        world.deliver()
        hour = world.now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=20)
        period = Window(hour, hour + timedelta(hours=1))
        changed = world.settings.destinations.orb.model_copy(update={"properties_mapping": {"endpoint": "route"}})
        destination = get_destination("orb", world.settings.model_copy(update={
            "destinations": world.settings.destinations.model_copy(update={"orb": changed})}))
        with world.hook() as hook:
            job = world.job(hook, "replace-1", destination=destination, chunk_size=100, concurrency=2)
            report = replace_window(job, world.settings.source.events, period)
        in_period = [e for e in world.sandbox.accepted() if period.start.isoformat()[:13] == e["timestamp"][:13]]
        assert in_period and report.accepted == len(in_period)
        api_calls = [e for e in in_period if e["event_name"] == "API Call"]
        assert api_calls and all(set(e["properties"]) <= {"route"} for e in in_period)
        assert any("route" in e["properties"] for e in api_calls), "the new mapping is what Orb holds now"
        outside = [e for e in world.sandbox.accepted() if e not in in_period]
        assert outside and all("route" not in e["properties"] for e in outside), "other periods untouched"
        key = api_calls[0]["idempotency_key"]
        history = world.ledger.history_of("orb", key)
        assert len(history) == 1 and history[0]["status"] == "delivered" and history[0]["mode"] == "backfill"
        assert world.ledger.status_of("orb", [key]) == {key: "delivered"}
        (record,) = [b for b in world.ledger.backfill_records("orb") if b["replace_existing_events"]]
        assert record["status"] == "reflected"


def test_the_sweep_delivers_rows_loaded_behind_the_lookback(pg_engine, schemas, monkeypatch):
    for world in make_world("kable", pg_engine, schemas, monkeypatch, events_per_hour=10, hours=6):
        recent = Window(world.now - timedelta(hours=7), world.now + timedelta(hours=1), timedelta(hours=6))
        world.deliver(window=recent)
        with world.engine.begin() as conn:  # rows whose load is older than any hourly run's lookback
            conn.execute(sa.text(
                f'UPDATE "{world.schema}".api_call SET received_at = received_at - interval \'2 days\' '
                # Seven distinct ids (a duplicated row is two rows of one id), the same seven every time.
                f"WHERE id IN (SELECT DISTINCT id FROM \"{world.schema}\".api_call WHERE user_id IS NOT NULL "
                f"ORDER BY id LIMIT 7)"))
            conn.execute(sa.text(f'DELETE FROM "{world.ledger.schema}".deliveries WHERE idempotency_key IN '
                                 f'(SELECT id FROM "{world.schema}".api_call WHERE received_at < :old)'),
                         {"old": world.now - timedelta(days=1)})
        missing = loaded_between(world, world.now - timedelta(days=7), world.now - timedelta(days=1))
        assert len(missing) == 7
        horizon = Window(world.now - timedelta(days=7), world.now + timedelta(hours=1))
        with world.hook() as hook:
            report = sweep(world.job(hook, "s1", chunk_size=200, concurrency=2, now=lambda: world.now),
                           world.settings.source.events, horizon)
        assert report.missing_before == 7 and report.delivered_by_sweep == 7 and report.missing_after == 0
        assert "still missing" in report.render()
        assert world.sandbox.accepted_keys() >= missing
        with world.hook() as hook:
            again = sweep(world.job(hook, "s2", chunk_size=200, concurrency=2, now=lambda: world.now),
                           world.settings.source.events, horizon)
        assert again.missing_before == 0 and again.delivered_by_sweep == 0


def test_the_sweep_stores_its_count_of_each_whole_day_for_the_billing_view(pg_engine, schemas, monkeypatch):
    for world in make_world("kable", pg_engine, schemas, monkeypatch, events_per_hour=4, hours=30):
        today = world.now.replace(hour=0, minute=0, second=0, microsecond=0)
        horizon = Window(today - timedelta(days=3), today)
        stored = world.ledger.day_counts_table
        for run in ("s1", "s2"):  # counted again: each day's row is replaced, not added
            with world.hook() as hook:
                report = sweep(world.job(hook, run, chunk_size=200, now=lambda: world.now),
                               world.settings.source.events, horizon)
            with world.engine.connect() as conn:
                rows = conn.execute(sa.select(stored).where(stored.c.destination == "kable")).all()
            assert sorted(row.day for row in rows) == report.recorded == [(today - timedelta(days=n)).date()
                                                                          for n in (3, 2, 1)]
            assert {row.day: DayCounts(row.warehouse, row.delivered, row.rejected, row.held) for row in rows} == {
                day: report.after.get(day, DayCounts()) for day in report.recorded}
            assert {(row.run_id, row.counted_at) for row in rows} == {(run, world.now)}
        assert sum(row.warehouse for row in rows) > 0 and report.missing_after == 0


def test_kable_counts_and_warns_about_old_events(pg_engine, schemas, monkeypatch):
    for world in make_world("kable", pg_engine, schemas, monkeypatch, events_per_hour=2, hours=48):
        reports = world.deliver(window=Window(world.now - timedelta(days=3), world.now + timedelta(hours=1)))
        old = sum(r.old_events for r in reports)
        assert old > 0
        assert all(e["timestamp"] < world.now.isoformat() for e in world.sandbox.accepted()), "true timestamps"
        assert any("older than" in r.render() for r in reports)
