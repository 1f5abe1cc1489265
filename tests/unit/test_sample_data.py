"""Segment Warehouses sample data, pure: the rows it generates, without a database."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from usage_billing.naming import flatten_path, snake_case
from usage_billing.sample_data import (
    BASE_COLUMNS,
    EVENTS,
    Sample,
    event_table,
    generate_rows,
    summarize,
)

START = datetime(2025, 3, 1, tzinfo=UTC)
HOURS = 24
PER_HOUR = 40
NOW = datetime(2025, 3, 10, tzinfo=UTC)  # long after the last late load
SEED = 7
HOUR = timedelta(hours=1)


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["id"], r["uuid_ts"]))


# --------------------------------------------------------------------------
# Event specs
# --------------------------------------------------------------------------

EXPECTED_PROPERTIES = {
    "api_call": {
        "endpoint": "endpoint",
        "method": "method",
        "statusCode": "status_code",
        "latencyMs": "latency_ms",
        "bytes": "bytes",
        "plan.tier": "plan_tier",
    },
    "payment_confirmed": {"amount": "amount", "currency": "currency", "confirmationTime": "confirmation_time"},
    "tokens_used": {
        "model": "model",
        "inputTokens": "input_tokens",
        "outputTokens": "output_tokens",
        "plan.tier": "plan_tier",
    },
}
EXPECTED_NAMES = {"api_call": "API Call", "payment_confirmed": "Payment Confirmed", "tokens_used": "Tokens Used"}
EXPECTED_BASE = [
    "id",
    "anonymous_id",
    "user_id",
    "event",
    "event_text",
    "timestamp",
    "original_timestamp",
    "sent_at",
    "received_at",
    "uuid_ts",
    "context_library_name",
    "context_library_version",
    "context_ip",
    "context_traits_account_id",
    "context_group_id",
]


@pytest.mark.parametrize("slug", sorted(EXPECTED_PROPERTIES), ids=sorted(EXPECTED_PROPERTIES))
def test_event_specs_map_segment_properties_to_columns(slug: str) -> None:
    spec = EVENTS[slug]
    assert spec.name == EXPECTED_NAMES[slug]
    assert spec.slug == slug == snake_case(spec.name)
    assert spec.property_columns == EXPECTED_PROPERTIES[slug]
    assert all(flatten_path(p) == c for p, c in spec.property_columns.items())
    assert list(spec.columns) == EXPECTED_BASE + list(EXPECTED_PROPERTIES[slug].values())
    assert [name for name, _ in BASE_COLUMNS] == EXPECTED_BASE


def test_event_table_rejects_unsafe_schema_and_unknown_event() -> None:
    with pytest.raises(ValueError, match="not a valid SQL identifier"):
        event_table(sa.MetaData(), "prod; drop table x", "api_call")
    with pytest.raises(ValueError, match="unknown sample event"):
        event_table(sa.MetaData(), "prod_api", "page_viewed")
    metadata = sa.MetaData()
    assert event_table(metadata, "prod_api", "api_call") is event_table(metadata, "prod_api", "api_call")


# --------------------------------------------------------------------------
# Pure generation
# --------------------------------------------------------------------------


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    first = generate_rows(Sample(START, 6, 30, seed=3, now=NOW))
    assert first == generate_rows(Sample(START, 6, 30, seed=3, now=NOW))
    other = generate_rows(Sample(START, 6, 30, seed=4, now=NOW))
    assert {r["id"] for r in first["api_call"]}.isdisjoint({r["id"] for r in other["api_call"]})


def test_hour_by_hour_equals_one_call() -> None:
    whole = generate_rows(Sample(START, 5, 25, seed=1, now=NOW))
    pieces: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(5):
        for slug, rows in generate_rows(Sample(START + i * HOUR, 1, 25, seed=1, now=NOW)).items():
            pieces[slug].extend(rows)
    assert whole == dict(pieces)


def test_events_subset_and_naive_start() -> None:
    rows = generate_rows(Sample(START.replace(tzinfo=None), 2, 10, seed=1, events=["tokens_used"], now=NOW))
    assert list(rows) == ["tokens_used"]
    assert rows == generate_rows(Sample(START, 2, 10, seed=1, events=["tokens_used"], now=NOW))
    with pytest.raises(ValueError, match="unknown sample event"):
        generate_rows(Sample(START, 1, 1, events=["nope"], now=NOW))


def test_nothing_is_generated_after_now() -> None:
    now = START + timedelta(hours=10, minutes=30)
    rows = generate_rows(Sample(START, HOURS, 60, seed=2, now=now))
    flat = [r for batch in rows.values() for r in batch]
    assert flat
    assert max(r["timestamp"] for r in flat) <= now
    assert max(r["uuid_ts"] for r in flat) <= now  # rows not loaded yet are absent
    assert max(r["timestamp"] for r in flat) >= START + timedelta(hours=10)
    # A later "now" only adds rows: the earlier picture is a subset.
    later = generate_rows(Sample(START, HOURS, 60, seed=2, now=NOW))
    for slug, batch in rows.items():
        later_rows = {(r["id"], r["uuid_ts"]): r for r in later[slug]}
        assert all(later_rows[(r["id"], r["uuid_ts"])] == r for r in batch)
    assert generate_rows(Sample(now + HOUR, 3, 60, now=now)) == {slug: [] for slug in EVENTS}


def test_rows_look_like_a_segment_warehouse() -> None:
    customers = 12
    rows = generate_rows(Sample(START, 24, 500, seed=11, customers=customers, now=NOW))
    flat = [r for batch in rows.values() for r in batch]
    stats = summarize(rows)
    n = stats.unique_events
    assert n == 24 * 500 * 3

    # Rates of the warts, within generous bounds.
    assert 0.015 < stats.duplicates / n < 0.025
    assert 0.02 < stats.anonymous / stats.rows < 0.04
    first_copies = {}
    for r in sorted(flat, key=lambda r: r["uuid_ts"]):
        first_copies.setdefault(r["id"], r)
    late = [r for r in first_copies.values() if r["uuid_ts"] - r["timestamp"] > HOUR]
    very_late = [r for r in late if r["uuid_ts"] - r["timestamp"] > 6 * HOUR]
    assert 0.04 < len(late) / n < 0.06
    assert 0.007 < len(very_late) / n < 0.013
    assert max(r["uuid_ts"] - r["timestamp"] for r in late) <= 31 * HOUR
    # Both kinds of lateness: queued on the client and held up by a failed sync.
    assert any(r["received_at"] - r["timestamp"] > HOUR for r in late)
    assert any(r["received_at"] - r["timestamp"] < timedelta(seconds=31) for r in late)

    for r in first_copies.values():
        window = START + HOUR * ((r["timestamp"] - START) // HOUR)
        assert window <= r["timestamp"] < window + HOUR
        assert r["received_at"] >= r["timestamp"]
        assert r["uuid_ts"] >= r["received_at"]
        # Segment's skew correction holds exactly.
        assert r["timestamp"] == r["received_at"] - (r["sent_at"] - r["original_timestamp"])
        if r["uuid_ts"] - r["timestamp"] <= HOUR:
            assert r["received_at"] - r["timestamp"] <= timedelta(seconds=30)
            assert r["uuid_ts"] - r["received_at"] <= timedelta(minutes=40)
        assert r["timestamp"].tzinfo is UTC
        assert len(r["id"]) <= 100
        if r["user_id"] is None:
            assert r["anonymous_id"] is not None
            assert r["context_traits_account_id"] is None
        else:
            assert r["user_id"].startswith("cus_")
            assert r["context_traits_account_id"].startswith("acct_")

    # Sparse properties.
    api = rows["api_call"]
    assert 0.07 < sum(r["bytes"] is None for r in api) / len(api) < 0.13
    assert 0.16 < sum(r["plan_tier"] is None for r in api) / len(api) < 0.24
    assert all(r["status_code"] is not None and isinstance(r["status_code"], int) for r in api)
    tokens = rows["tokens_used"]
    assert all(isinstance(r["input_tokens"], int) and r["input_tokens"] > 0 for r in tokens)
    payments = rows["payment_confirmed"]
    assert all(r["currency"] in {"USD", "EUR", "GBP"} for r in payments)
    assert all(isinstance(r["amount"], float) and round(r["amount"], 2) == r["amount"] for r in payments)
    identified = [r for r in flat if r["user_id"] is not None]
    assert 0.4 < sum(r["context_group_id"] is not None for r in identified) / len(identified) < 0.6

    # Customers: all present, skewed volume, one account per customer.
    volume = Counter(r["user_id"] for r in identified)
    assert len(volume) == customers
    top3 = sum(count for _, count in volume.most_common(3))
    assert top3 / len(identified) > 0.45
    accounts = {(r["user_id"], r["context_traits_account_id"]) for r in identified}
    assert len(accounts) == customers


def test_generate_rows_validates_arguments() -> None:
    with pytest.raises(ValueError):
        generate_rows(Sample(START, -1, 10, now=NOW))
    with pytest.raises(ValueError):
        generate_rows(Sample(START, 1, 10, customers=0, now=NOW))


# --------------------------------------------------------------------------
# Tables on both backends
# --------------------------------------------------------------------------

