"""The delivery core against real sandboxes on loopback and the real PostgreSQL.

Every test runs against Orb and against Kable (the `world` fixture): one conformance suite for
both adapters. Each asserts the same invariant: every deliverable event accepted exactly once, every
other event rejected with a reason, none lost.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from tests.integration.conftest import make_world
from usage_billing.delivery import DeliveryFailed
from usage_billing.destinations import DESTINATIONS
from usage_billing.sandbox import Fault


def assert_exactly_once(world) -> None:
    deliverable = world.deliverable_ids()
    assert deliverable, "the sample data has deliverable events"
    assert world.sandbox.accepted_keys() == deliverable
    assert len(world.sandbox.accepted()) == len(deliverable)
    assert world.ledger_keys("delivered") == deliverable
    assert world.ledger_keys("rejected") == world.undeliverable_ids()
    assert set(world.ledger.counts(world.name)[world.name]) == {"delivered", "rejected"}, "no other status"


def test_every_deliverable_event_arrives_once_and_the_rest_are_rejected_with_a_reason(world):
    reports = world.deliver()
    assert_exactly_once(world)
    assert sum(r.duplicates_dropped for r in reports) == world.stats.duplicates
    assert sum(r.mapping_rejected for r in reports) == len(world.undeliverable_ids())
    reasons = dict(world.ledger.rejected_reasons(world.name))
    assert any("is empty" in reason for reason in reasons), reasons


def test_a_rerun_sends_nothing(world):
    world.deliver(run="first")
    requests_before = len(world.sandbox.requests)
    reports = world.deliver(run="second")
    assert len(world.sandbox.requests) == requests_before
    assert sum(r.sent for r in reports) == 0
    assert sum(r.mapping_rejected for r in reports) == 0, "a rejected row not loaded again is not rejected again"
    assert sum(r.already_delivered for r in reports) == len(world.deliverable_ids()) + len(world.undeliverable_ids())
    assert_exactly_once(world)


def test_a_delivery_leaves_stale_ledger_statistics_to_the_report_task(pg_engine, schemas, monkeypatch):
    """No ANALYZE inside a deliver task: the run's report task refreshes them after the deliveries."""
    for world in make_world("orb", pg_engine, schemas, monkeypatch):
        world.deliver(run="first")
        # PostgreSQL publishes a backend's row counts about a second after its transaction.
        deadline = time.monotonic() + 10
        while not stale(world):
            assert time.monotonic() < deadline, "the first delivery's marks must make the statistics stale"
            time.sleep(0.2)
        world.deliver(run="second")
        assert stale(world), "the rerun ran ANALYZE"
        assert world.ledger.refresh_statistics() and not stale(world)


def stale(world) -> bool:
    """Autovacuum's rule, as Ledger.refresh_statistics applies it (read here without acting on it)."""
    with world.engine.connect() as conn:
        changed, rows = conn.execute(sa.text(
            "SELECT s.n_mod_since_analyze, c.reltuples FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
            "WHERE s.schemaname = :schema AND s.relname = 'deliveries'"), {"schema": world.ledger.schema}).one()
    return changed > 50 + 0.1 * max(rows, 0)


@pytest.mark.parametrize("name", list(DESTINATIONS))
def test_batches_respect_the_configured_size(name, pg_engine, schemas, monkeypatch):
    for world in make_world(name, pg_engine, schemas, monkeypatch,
                            destination_overrides={name: {"batch_size": 7}}):
        reports = world.deliver()
        sizes = [r.n_events for r in world.ingest_requests()]
        assert max(sizes) == 7
        assert sum(r.batches for r in reports) == len(sizes) >= len(world.deliverable_ids()) / 7
        assert_exactly_once(world)


@pytest.mark.parametrize(("fault", "options"), [
    (Fault.TOO_MANY_REQUESTS, {"retry_after": 2.5}),
    (Fault.TOO_MANY_REQUESTS, {}),
    (Fault.SERVER_ERROR, {"status": 500}),
    (Fault.SERVER_ERROR, {"status": 502}),
    (Fault.SERVER_ERROR, {"status": 503}),
    (Fault.SLOW, {"delay": 3.0}),
    (Fault.RESET, {}),
    (Fault.LOST_RESPONSE, {}),
], ids=["429-retry-after", "429-no-retry-after", "500", "502", "503", "slow-past-timeout", "connection-reset",
        "lost-response"])
def test_transient_faults_are_retried_to_exactly_once(world, fault, options):
    world.sandbox.inject(fault, times=2, **options)
    reports = world.deliver()
    assert sum(r.retries for r in reports) >= 2
    assert_exactly_once(world)
    if fault == Fault.TOO_MANY_REQUESTS and options.get("retry_after"):
        assert 2.5 in world.sleeps, "Retry-After is honoured"
    if fault == Fault.LOST_RESPONSE:
        assert world.sandbox.duplicates >= 1, "the resend carried the same idempotency keys"


def test_exhausted_retries_fail_cleanly_and_the_next_try_sends_the_rest(world):
    world.sandbox.inject(Fault.SERVER_ERROR, times=10_000, status=503)
    with pytest.raises(DeliveryFailed, match="not confirmed"):
        world.deliver(run="run-1", tables=["api_call"])
    assert not world.ledger_keys("delivered"), "nothing marked delivered that was not confirmed"
    world.sandbox.clear_faults()
    world.deliver(run="run-1")  # Airflow's next try of the same run
    assert_exactly_once(world)


def test_a_batch_refused_whole_is_bisected_and_its_good_events_delivered(world):
    world.sandbox.inject(Fault.BAD_REQUEST, times=1)
    reports = world.deliver(tables=["api_call"])
    assert sum(r.bisections for r in reports) >= 1
    assert not any(r.destination_rejected for r in reports)
    delivered = world.ledger_keys("delivered")
    assert delivered == world.deliverable_ids(tables=["api_call"]), "every good event of the refused batch"
    assert world.sandbox.accepted_keys() == delivered
    assert sum(r.requests for r in reports) == len(world.ingest_requests()), "the refused request is counted"
