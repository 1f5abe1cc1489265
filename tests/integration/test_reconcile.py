"""Reconciliation against the Orb sandbox over HTTP and the real PostgreSQL (issue 14, item 1).

Each test sets up a world whose ledger says every deliverable event was delivered, then makes Orb,
the ledger or the warehouse disagree the way it happens in production, and checks that the hourly
comparison and the key check find it, that healing re-sends exactly what Orb lost under the same
key, and that the ledger records the finding.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest
import requests
import sqlalchemy as sa
import yaml

from tests.integration.conftest import ORB_KEY, config, make_world
from usage_billing.reconcile import Checking, reconcile
from usage_billing.reconcile.compare import DISAGREES, SAMPLE, hour_of

HOURS = 30
HOUR = timedelta(hours=1)


@pytest.fixture
def orb_world(pg_engine, schemas, monkeypatch):
    """30 hours of Segment data delivered to the Orb sandbox: the older half is past Orb's grace period."""
    for world in make_world("orb", pg_engine, schemas, monkeypatch, events_per_hour=6, hours=HOURS):
        world.deliver()
        yield world


def check(world, run: str = "rec-1", **options):
    """Reconcile the world's whole range through the Orb hook, as the task does."""
    start = hour_of(world.now) - (HOURS + 1) * HOUR
    with world.hook() as hook:
        return reconcile(world.job(hook, run), world.settings.source.events, start, world.now, Checking(**options))


def delivered_key(world, older_than: timedelta | None = None, newer_than: timedelta | None = None) -> tuple[str, datetime]:
    t = world.ledger.table.c
    query = sa.select(t.idempotency_key, t.event_timestamp).where(t.destination == "orb", t.status == "delivered")
    if older_than is not None:
        query = query.where(t.event_timestamp < world.now - older_than)
    if newer_than is not None:
        query = query.where(t.event_timestamp > world.now - newer_than)
    with world.engine.connect() as conn:
        return tuple(conn.execute(query.order_by(t.idempotency_key).limit(1)).one())


def test_a_delivered_range_agrees_hour_by_hour(orb_world):
    report = check(orb_world, sample_hours=2)
    assert report.unresolved() == [], report.render()
    busy = [line for line in report.lines if line.ledger]
    assert len(busy) >= HOURS and all(line.destination == line.ledger for line in report.lines)
    assert sum(line.warehouse - line.rejected for line in report.lines) == sum(line.ledger for line in report.lines)
    assert [line.checked for line in report.lines].count(SAMPLE) == 2, "agreeing hours are sampled"
    assert orb_world.ledger.findings("orb") == []


def test_events_deleted_from_orb_are_found_by_hour_and_by_key_and_healed(orb_world):
    world = orb_world
    recent, recent_at = delivered_key(world, newer_than=timedelta(hours=6))
    old, old_at = delivered_key(world, older_than=timedelta(hours=14))
    assert world.sandbox.delete_events([recent, old]) == 2
    backfills = len(world.sandbox.backfills())

    report = check(world, sample_hours=0)

    lost = {line.hour: line for line in report.lines if line.lost}
    assert {hour: line.lost for hour, line in lost.items()} == {hour_of(recent_at): [recent], hour_of(old_at): [old]}
    assert all(line.checked == DISAGREES and line.destination == line.ledger - 1 for line in lost.values())
    assert report.healed == 2 and report.unresolved() == [], report.render()
    assert {recent, old} <= world.sandbox.accepted_keys(), "Orb holds them again"
    assert world.sandbox.duplicates == 0
    assert len(world.sandbox.backfills()) == backfills + 1, "the old one went through a backfill"
    assert world.ledger.status_of("orb", [recent, old]) == {recent: "delivered", old: "delivered"}
    findings = world.ledger.findings("orb")
    assert {(f["kind"], f["idempotency_key"], f["healed_by_run"]) for f in findings} == {
        ("missing_in_destination", recent, "rec-1"), ("missing_in_destination", old, "rec-1")}
    assert "re-sent under their keys, 1 healed" in report.render()

    again = check(world, "rec-2", sample_hours=0)
    assert again.checked_hours == [] and again.unresolved() == [] and len(world.ledger.findings("orb")) == 2


def test_events_in_orb_the_ledger_does_not_know_are_reported_not_healed(orb_world):
    world = orb_world
    unmarked, unmarked_at = delivered_key(world, newer_than=timedelta(hours=6))
    with world.engine.begin() as conn:  # a lost mark: Orb has it, the ledger does not
        conn.execute(sa.delete(world.ledger.table).where(world.ledger.table.c.idempotency_key == unmarked))
    foreign_at = hour_of(world.now) - 2 * HOUR + timedelta(minutes=7)  # another system, same account
    foreign = {"event_name": "other_ingester", "idempotency_key": "not-ours-1", "external_customer_id": "acct_x",
               "timestamp": foreign_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "properties": {"n": 1}}
    assert requests.post(f"{world.sandbox.url}/v1/ingest", json={"events": [foreign]}, timeout=5,
                         headers={"Authorization": f"Bearer {ORB_KEY}"}).status_code == 200

    report = check(world, sample_hours=0)

    by_hour = {line.hour: line for line in report.lines}
    assert by_hour[hour_of(unmarked_at)].unknown == [unmarked]
    assert by_hour[hour_of(foreign_at)].unmatched == 1
    assert report.lost == 0 and {unmarked, "not-ours-1"} <= world.sandbox.accepted_keys(), "nothing deleted"
    assert world.ledger.status_of("orb", [unmarked]) == {}, "nothing marked"
    kinds = {(f["kind"], f["idempotency_key"], f["healed_at"]) for f in world.ledger.findings("orb")}
    assert ("unknown_to_ledger", unmarked, None) in kinds and ("unmatched_count", None, None) in kinds
    text = report.render()
    assert "(a lost mark): reported, not deleted" in text and "another system ingesting" in text
    assert len(report.unresolved()) == 2 and "result: DISAGREES" in text


def test_a_row_loaded_after_the_cutoff_is_left_to_the_hourly_runs_not_a_difference(orb_world):
    """The daily sweep's reconcile runs while rows keep arriving: a row loaded after the sweep's scan
    and not delivered yet is the next hourly run's job, counted apart, not a failure."""
    world = orb_world
    table = f'"{world.schema}".api_call'
    stamp = hour_of(world.now) - 2 * HOUR + timedelta(minutes=11)
    with world.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TEMP TABLE arriving AS SELECT * FROM {table} WHERE user_id IS NOT NULL LIMIT 1"))
        conn.execute(sa.text("UPDATE arriving SET id = 'arrives-after-the-cutoff', timestamp = :t, received_at = :r"),
                     {"t": stamp, "r": world.now + timedelta(minutes=3)})
        conn.execute(sa.text(f"INSERT INTO {table} SELECT * FROM arriving"))

    report = check(world, sample_hours=0, loaded_before=world.now)
    assert report.unresolved() == [], report.render()
    assert {line.hour: line.loaded_later for line in report.lines if line.loaded_later} == {hour_of(stamp): 1}
    assert "1 events loaded at or after" in report.render()

    without_cutoff = check(world, run="rec-2", sample_hours=0)
    assert without_cutoff.unresolved() == [f"{hour_of(stamp):%Y-%m-%d %H}:00 1 warehouse events are not delivered"]


def test_the_task_logs_the_table_and_fails_loudly_when_a_difference_remains(orb_world, pg_url, monkeypatch,
                                                                              tmp_path, capfd):
    from billing_airflow.operators.reconcile import ReconcileOperator

    world = orb_world
    with world.engine.begin() as conn:
        conn.execute(sa.delete(world.ledger.table).where(
            world.ledger.table.c.idempotency_key == delivered_key(world, newer_than=timedelta(hours=6))[0]))
    path = tmp_path / "usage_billing.yaml"
    path.write_text(yaml.safe_dump(config(world.schema, world.ledger.schema)))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_WAREHOUSE",
                       sa.make_url(pg_url).set(drivername="postgresql").render_as_string(False))
    task = ReconcileOperator(task_id="reconcile_orb", destination="orb")
    context = {"dag": SimpleNamespace(dag_id="usage_billing_sweep"), "run_id": "scheduled__test",
               "data_interval_end": world.now + HOUR}
    with pytest.raises(RuntimeError, match="1 differences remain after healing"):
        task.execute(context)
    logged = capfd.readouterr()
    assert "reconciliation: destination=orb" in logged.out + logged.err
    assert "warehouse  ledger     orb" in logged.out + logged.err

    on_demand = ReconcileOperator(task_id="reconcile", destination="orb", start="None", end="None",
                                  required_range=True)
    with pytest.raises(ValueError, match="give both params start and end"):
        on_demand.execute(context)


def test_without_the_volume_comparison_every_hour_is_searched_by_key(orb_world):
    world = orb_world
    recent, _ = delivered_key(world, newer_than=timedelta(hours=6))
    world.sandbox.delete_events([recent])
    report = check(world, compare_volume=False)
    assert all(line.destination is None for line in report.lines)
    assert len(report.checked_hours) >= HOURS and report.healed == 1 and report.unresolved() == []
    searches = [r for r in world.sandbox.requests if r.path == "/v1/events/search"]
    assert len(searches) == report.searches and not [r for r in world.sandbox.requests
                                                      if r.path == "/v1/events/volume"]


class Busiest(random.Random):
    """Samples the busiest agreeing hours, so the test does not depend on the clock's hour."""

    def sample(self, population, k):
        return sorted(population, key=lambda line: line.ledger)[-k:]


def test_a_busy_hour_is_searched_500_keys_at_a_time_and_a_long_range_counted_page_by_page(pg_engine, schemas,
                                                                                         monkeypatch):
    for world in make_world("orb", pg_engine, schemas, monkeypatch, events_per_hour=400, hours=2):
        world.deliver()
        # Whole hours only (the current one is still filling up): 150 of them, two volume pages of 100.
        end = hour_of(world.now)
        with world.hook() as hook:
            report = reconcile(world.job(hook, "rec-busy"), world.settings.source.events, end - 150 * HOUR, end,
                               Checking(sample_hours=1, rng=Busiest()))
        assert report.unresolved() == [], report.render()
        (sampled,) = report.checked_hours
        assert sampled.ledger > 500
        volume = [r for r in world.sandbox.requests if r.path == "/v1/events/volume"]
        searches = [r for r in world.sandbox.requests if r.path == "/v1/events/search"]
        assert len(volume) == 2 and len(searches) == -(-sampled.ledger // 500) == report.searches


def test_kable_is_reconciled_warehouse_against_ledger_only(pg_engine, schemas, monkeypatch):
    for world in make_world("kable", pg_engine, schemas, monkeypatch, events_per_hour=6, hours=6):
        world.deliver()
        some = next(iter(world.ledger_keys("delivered")))
        with world.engine.begin() as conn:
            conn.execute(sa.delete(world.ledger.table).where(world.ledger.table.c.idempotency_key == some))
        start = hour_of(world.now) - 7 * HOUR
        with world.hook() as hook:
            report = reconcile(world.job(hook, "rec-kable"), world.settings.source.events, start, world.now)
        assert "kable has no read API" in report.render()
        assert all(line.destination is None for line in report.lines) and report.checked_hours == []
        assert [r for r in world.sandbox.requests if r.path != "/api/v1/events/create"] == []
        assert len(report.unresolved()) == 1 and "1 warehouse events are not delivered" in report.unresolved()[0]
        assert [f["kind"] for f in world.ledger.findings("kable")] == ["not_delivered"]

