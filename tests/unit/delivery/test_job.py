"""``DeliveryJob``: what a task's job takes from the configuration, when it sends rejections again,
and when the ledger filter runs inside the extraction query."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from tests.unit.delivery.conftest import PARTITION, WINDOW, settings
from usage_billing.delivery import DeliveryJob, Scope
from usage_billing.destinations import get_destination
from usage_billing.ledger import RetryRejected, RunRef
from usage_billing.sources.base import SourceKind


def test_a_job_from_settings_takes_the_source_and_destination_knobs(core):
    config = settings("orb", concurrency=5)
    run = RunRef("segment_to_orb", "scheduled__1")
    job = DeliveryJob.from_settings(config, get_destination("orb", config), core.source, core.ledger, core.sender, run)
    assert (job.loaded_at_column, job.chunk_size, job.concurrency) == ("received_at", 100, 5)
    assert (job.source, job.ledger, job.sender, job.run) == (core.source, core.ledger, core.sender, run)
    assert job.retry_rejected and not job.backfill_per_run, "a task's delivery: rejections retried, its own queue"


@pytest.mark.parametrize(("retry_rejected", "scope", "expected"), [
    (True, Scope(PARTITION, WINDOW), RetryRejected.RELOADED),
    (True, Scope(PARTITION, ids=["m00001"]), RetryRejected.ALWAYS),
    (False, Scope(PARTITION, WINDOW), RetryRejected.NEVER),
    (False, Scope(PARTITION, ids=["m00001"]), RetryRejected.NEVER),
], ids=["a-window-retries-rows-loaded-again", "a-replay-retries-always", "the-sweep-never", "the-sweep-by-id-never"])
def test_when_a_delivery_sends_rejected_events_again(core, retry_rejected, scope, expected):
    job = dataclasses.replace(core.job(), retry_rejected=retry_rejected)
    assert job.retry_for(scope) is expected


def source(ledger_join: bool, same_database: bool) -> SimpleNamespace:
    """A source whose kind declares (or not) the in-query ledger filter, sharing (or not) the ledger's database."""
    kind = SourceKind(name="stub", conn_types=(), open=lambda settings: None, ledger_join=ledger_join)
    return SimpleNamespace(kind=kind, shares_database_with=lambda engine: same_database)


@pytest.mark.parametrize(("ledger_join", "same_database", "expected"), [
    (True, True, True),
    (True, False, False),
    (False, True, False),
], ids=["declared-and-same-database", "declared-other-database", "not-declared"])
def test_the_ledger_filter_joins_only_a_declaring_source_in_the_ledgers_database(core, ledger_join, same_database,
                                                                                  expected):
    job = dataclasses.replace(core.job(), source=source(ledger_join, same_database))
    assert job.ledger_join is expected


def test_the_in_memory_source_never_joins_the_ledger(core):
    assert core.job().ledger_join is False
