"""The ledger's check -> send -> mark protocol on the real PostgreSQL (and on SQLite)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from usage_billing.destinations.base import Rejection
from usage_billing.ledger import Ledger, RunRef
from usage_billing.warehouse import create_engine

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
RUN_A = RunRef("segment_to_orb", "scheduled__A")
RUN_B = RunRef("segment_to_orb", "backfill__B")


@pytest.fixture(params=["postgresql", "sqlite"])
def ledger(request, schemas, pg_url, tmp_path):
    if request.param == "postgresql":
        engine = create_engine(pg_url)
        schema = schemas[1]
    else:
        schema = "usage_billing"
        engine = create_engine(f"sqlite:///{tmp_path}/wh.db", [schema])
    book = Ledger(engine, schema, claim_ttl=timedelta(minutes=30))
    book.create()
    book.create()  # idempotent
    yield book
    engine.dispose()


def claim(book: Ledger, run: RunRef, keys: list[str], now: datetime = T0):
    return book.claim("orb", run, keys, keys, ["api_call"] * len(keys), [T0] * len(keys), now)


def test_new_keys_are_claimed_and_delivered_keys_are_skipped(ledger):
    assert claim(ledger, RUN_A, ["a", "b", "c"]).claimed == {"a", "b", "c"}
    ledger.mark_delivered("orb", ["a", "b"], T0)
    result = claim(ledger, RUN_B, ["a", "b", "c", "d"], T0 + timedelta(hours=2))
    assert result.claimed == {"c", "d"}  # c: A's claim expired without confirmation
    assert result.already_delivered == 2
    assert ledger.counts("orb") == {"orb": {"delivered": 2, "pending": 2}}


def test_a_live_claim_of_another_run_is_respected(ledger):
    claim(ledger, RUN_A, ["a", "b"])
    result = claim(ledger, RUN_B, ["a", "b", "c"], T0 + timedelta(minutes=5))
    assert result.claimed == {"c"} and result.in_flight_elsewhere == 2


def test_the_same_run_reclaims_its_own_claim_on_retry(ledger):
    claim(ledger, RUN_A, ["a", "b"])
    assert claim(ledger, RUN_A, ["a", "b"], T0 + timedelta(minutes=1)).claimed == {"a", "b"}


def test_released_keys_can_be_claimed_at_once(ledger):
    claim(ledger, RUN_A, ["a", "b"])
    ledger.release("orb", RUN_A, ["a"])
    assert claim(ledger, RUN_B, ["a", "b"], T0 + timedelta(minutes=1)).claimed == {"a"}


def test_destinations_are_independent(ledger):
    claim(ledger, RUN_A, ["a"])
    ledger.mark_delivered("orb", ["a"], T0)
    result = ledger.claim("kable", RUN_A, ["a"], ["a"], ["api_call"], [T0], T0)
    assert result.claimed == {"a"}


def test_rejected_keys_are_recorded_with_reason_and_retried_later(ledger):
    ledger.mark_rejected("orb", RUN_A, [Rejection("x", "x", "api_call", "api_call row id=x: no external customer ID",
                                                  T0)], T0)
    ledger.mark_rejected("orb", RUN_A, [Rejection("y", "y", "api_call", "api_call row id=y: no external customer ID",
                                                  T0)], T0)
    assert ledger.rejected_reasons("orb") == [("no external customer ID", 2)]
    rows = ledger.rejected("orb")
    assert [r["idempotency_key"] for r in rows] == ["x", "y"] and rows[0]["event_table"] == "api_call"
    # Once fixed, a rejected event is claimed again by the next run that extracts it.
    assert claim(ledger, RUN_B, ["x"]).claimed == {"x"}


def test_a_delivered_event_is_never_downgraded_to_rejected(ledger):
    claim(ledger, RUN_A, ["a"])
    ledger.mark_delivered("orb", ["a"], T0)
    ledger.mark_rejected("orb", RUN_B, [Rejection("a", "a", "api_call", "later mapping change")], T0)
    assert ledger.status_of("orb", ["a"]) == {"a": "delivered"}


def test_attempts_and_runs_are_recorded(ledger):
    claim(ledger, RUN_A, ["a"])
    ledger.release("orb", RUN_A, ["a"])
    claim(ledger, RUN_B, ["a"], T0 + timedelta(minutes=1))
    with ledger.engine.connect() as conn:
        import sqlalchemy as sa

        row = conn.execute(sa.select(ledger.table).where(ledger.table.c.idempotency_key == "a")).mappings().one()
    assert row["attempts"] == 2 and row["run_id"] == "backfill__B" and row["status"] == "pending"


def test_concurrent_claims_never_hand_one_key_to_two_runs(ledger):
    """Ten overlapping runs race for the same 2,000 keys: each key is claimed exactly once."""
    keys = [f"k{i}" for i in range(2000)]
    runs = [RunRef("segment_to_orb", f"run{i}") for i in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda run: claim(ledger, run, keys).claimed, runs))
    claimed = [key for result in results for key in result]
    assert sorted(claimed) == sorted(keys)
