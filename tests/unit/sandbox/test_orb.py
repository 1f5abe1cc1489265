"""The Orb sandbox (``usage_billing.sandbox.orb``) over real loopback HTTP: ingest, validation as Orb's
API reference states it, backfills, reading events back, customers, and the fast paths of its ingest."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.unit.sandbox.conftest import (
    ORB_AUTH,
    ORB_ERRORS,
    ORB_KEY,
    ingest,
    iso,
    now,
    orb_event,
    wait_until,
    without,
)
from usage_billing.sandbox import Fault, OrbSandbox, ServerOptions
from usage_billing.sandbox.orb import EVENT_FIELDS, FUTURE_TOLERANCE, _plainly_valid, parse_timestamp

pytestmark = pytest.mark.timeout(60)


# ============================================================================ Orb: basics


def test_orb_accepts_batch_and_logs_request(orb: OrbSandbox) -> None:
    events = [orb_event(f"k{i}") for i in range(3)]
    resp = ingest(orb, events)
    assert resp.status_code == 200
    assert resp.json() == {"validation_failed": []}
    assert orb.accepted() == events
    assert orb.accepted_keys() == {"k0", "k1", "k2"}
    assert orb.url.startswith("http://127.0.0.1:")
    [record] = orb.requests
    assert (record.method, record.path, record.status, record.n_events, record.fault) == (
        "POST",
        "/v1/ingest",
        200,
        3,
        None,
    )
    assert record.received_at.tzinfo is not None


def test_orb_keep_alive_connection_is_reused_without_nagle_stalls(orb: OrbSandbox) -> None:
    from usage_billing.sandbox.server import _Handler

    with requests.Session() as session:
        for i in range(20):
            assert ingest(orb, [orb_event(f"k{i}")], session=session).status_code == 200
        pools = session.get_adapter(orb.url).poolmanager.pools
        opened = sum(pools[key].num_connections for key in pools.keys())
        assert opened == 1, "one keep-alive connection for all 20 requests"
    # With Nagle's algorithm on, each request would stall ~40 ms on delayed ACKs.
    assert _Handler.disable_nagle_algorithm is True
    assert len(orb.accepted_keys()) == 20


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {ORB_KEY}"}, {"Authorization": "Bearer"}],
    ids=["missing_header", "wrong_key", "basic_scheme", "empty_token"],
)
def test_orb_rejects_bad_auth(orb: OrbSandbox, headers: dict[str, str]) -> None:
    resp = requests.post(f"{orb.url}/v1/ingest", json={"events": [orb_event("k")]}, headers=headers, timeout=5)
    assert resp.status_code == 401
    body = resp.json()
    assert body["type"] == f"{ORB_ERRORS}#401-authentication-error"
    assert body["status"] == 401 and body["title"] and body["detail"]
    assert "wrong-key" not in resp.text and ORB_KEY not in resp.text
    assert orb.accepted() == []


def test_orb_bearer_scheme_is_case_insensitive(orb: OrbSandbox) -> None:
    resp = requests.post(
        f"{orb.url}/v1/ingest",
        json={"events": [orb_event("k")]},
        headers={"authorization": f"bearer {ORB_KEY}"},
        timeout=5,
    )
    assert resp.status_code == 200


# ============================================================================ Orb: validation


@pytest.mark.parametrize(
    ("make_event", "message"),
    [
        (lambda: without(orb_event("bad"), "event_name"), "Missing required field 'event_name'"),
        (lambda: orb_event("bad", event_name=""), "event_name must be a non-empty string"),
        (lambda: orb_event("bad", event_name=7), "event_name must be a non-empty string"),
        (lambda: without(orb_event("bad"), "idempotency_key"), "Missing required field 'idempotency_key'"),
        (lambda: orb_event(""), "idempotency_key must be a non-empty string"),
        (lambda: without(orb_event("bad"), "timestamp"), "Missing required field 'timestamp'"),
        (lambda: orb_event("bad", timestamp="yesterday"), "is not a valid ISO 8601 date-time"),
        (lambda: orb_event("bad", timestamp="2026-02-30T00:00:00Z"), "is not a valid ISO 8601 date-time"),
        (lambda: orb_event("bad", timestamp=1700000000), "timestamp must be an ISO 8601 date-time string"),
        (lambda: orb_event("bad", timestamp=iso(now())[:-1]), "no timezone designator"),
        (
            # The same instant as a minute ago, written in UTC+2.
            lambda: orb_event("bad", timestamp=(now() + timedelta(minutes=119)).strftime("%Y-%m-%dT%H:%M:%S+02:00")),
            "must be in UTC",
        ),
        (lambda: orb_event("bad", timestamp=iso(now() + timedelta(minutes=6))), "at most 5 minutes in the future"),
        (
            lambda: orb_event("bad", timestamp=iso(now() - timedelta(hours=13))),
            "based on account grace period. To ingest an event older than the account grace period, create a backfill",
        ),
        (lambda: without(orb_event("bad"), "properties"), "Missing required field 'properties'"),
        (lambda: orb_event("bad", properties=["a"]), "properties must be an object"),
        (lambda: orb_event("bad", properties={"n": None}), "Property 'n' is null"),
        (lambda: orb_event("bad", properties={"n": {"x": 1}}), "nested dictionaries are disallowed"),
        (lambda: orb_event("bad", properties={"n": [1, 2]}), "Property 'n' is an array"),
        (lambda: orb_event("bad", properties={"n": 2**63}), "does not fit in a 64-bit signed integer"),
        (
            lambda: orb_event("bad", customer_id="cus_1"),
            "Exactly one of customer_id and external_customer_id must be specified",
        ),
        (
            lambda: without(orb_event("bad"), "external_customer_id"),
            "Exactly one of customer_id and external_customer_id must be specified",
        ),
        (
            lambda: orb_event("bad", external_customer_id=None, customer_id=None),
            "Exactly one of customer_id and external_customer_id must be specified",
        ),
        (lambda: orb_event("bad", external_customer_id=""), "external_customer_id must be a non-empty string"),
        (lambda: orb_event("bad", user_id="u1"), "Unexpected field 'user_id'"),
    ],
    ids=[
        "missing_event_name",
        "empty_event_name",
        "non_string_event_name",
        "missing_idempotency_key",
        "empty_idempotency_key",
        "missing_timestamp",
        "unparseable_timestamp",
        "impossible_date",
        "numeric_timestamp",
        "naive_timestamp",
        "non_utc_offset",
        "more_than_5_minutes_in_future",
        "older_than_grace_period",
        "missing_properties",
        "properties_not_object",
        "null_property_value",
        "nested_object_property",
        "array_property",
        "integer_beyond_int64",
        "both_customer_ids",
        "no_customer_id",
        "both_customer_ids_null",
        "empty_external_customer_id",
        "extra_event_field",
    ],
)
def test_orb_rejects_invalid_event_whole_request(
    orb: OrbSandbox, make_event: Callable[[], dict[str, Any]], message: str
) -> None:
    bad = make_event()
    resp = ingest(orb, [orb_event("good"), bad])
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == f"{ORB_ERRORS}#400-request-validation-errors"
    assert body["status"] == 400 and body["title"] == "Request validation errors"
    [failure] = body["validation_errors"]
    expected_key = bad.get("idempotency_key") if isinstance(bad.get("idempotency_key"), str) else ""
    assert failure["idempotency_key"] == expected_key
    assert any(message in err for err in failure["validation_errors"]), failure
    # The spec: failed keys are not marked processed, and with a 400 nothing is ingested.
    assert orb.accepted() == []


@pytest.mark.parametrize(
    "timestamp",
    [
        lambda: iso(now()),
        lambda: now().replace(microsecond=0).isoformat(),  # +00:00
        lambda: now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        lambda: iso(now() + timedelta(minutes=4)),
        lambda: iso(now() - timedelta(hours=11, minutes=59)),
    ],
    ids=["z_suffix_micros", "plus_zero_offset", "whole_seconds", "four_minutes_ahead", "inside_grace_period"],
)
def test_orb_accepts_valid_timestamps(orb: OrbSandbox, timestamp: Callable[[], str]) -> None:
    resp = ingest(orb, [orb_event("k", timestamp=timestamp())])
    assert resp.status_code == 200, resp.text
    assert orb.accepted_keys() == {"k"}


@pytest.mark.parametrize(
    "properties",
    [{}, {"s": "x", "i": -(2**63), "f": 1.5, "b": True}, {"max": 2**63 - 1}],
    ids=["empty_properties", "all_scalar_types", "int64_max"],
)
def test_orb_accepts_valid_properties(orb: OrbSandbox, properties: dict[str, Any]) -> None:
    assert ingest(orb, [orb_event("k", properties=properties)]).status_code == 200
    assert orb.accepted()[0]["properties"] == properties


def test_orb_accepts_customer_id_instead_of_external(orb: OrbSandbox) -> None:
    event = orb_event("k", customer_id="cus_1", external_customer_id=None)
    assert ingest(orb, [event]).status_code == 200


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b'[{"event_name": "x"}]', "JSON object"),
        (b'{"batch": []}', "JSON object"),
        (b'{"events": [], "debug": true}', "Unexpected top-level field"),
        (b'{"events": {"a": 1}}', "'events' must be an array"),
        (b'{"events": [{"event_name": "x", "properties": {"v": NaN}}]}', "not valid JSON"),
    ],
    ids=[
        "malformed_json",
        "empty_body",
        "array_body",
        "missing_events",
        "extra_top_level_field",
        "events_not_array",
        "nan_literal",
    ],
)
def test_orb_rejects_malformed_request_body(orb: OrbSandbox, data: bytes, detail: str) -> None:
    resp = requests.post(
        f"{orb.url}/v1/ingest", data=data, headers={**ORB_AUTH, "Content-Type": "application/json"}, timeout=5
    )
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == f"{ORB_ERRORS}#400-request-validation-errors"
    assert detail in body["detail"]
    assert body["validation_errors"] == []


def test_orb_debug_query_parameter_is_ignored(orb: OrbSandbox) -> None:
    resp = ingest(orb, [orb_event("k")], params={"debug": "true"})
    assert resp.json() == {"validation_failed": []}


@pytest.mark.parametrize(("count", "status"), [(500, 200), (501, 400)], ids=["exactly_500", "over_500"])
def test_orb_500_event_cap(orb: OrbSandbox, count: int, status: int) -> None:
    resp = ingest(orb, [orb_event(f"k{i}") for i in range(count)])
    assert resp.status_code == status
    if status == 400:
        assert "500 events per request" in resp.json()["detail"]
        assert orb.accepted() == []
    else:
        assert len(orb.accepted_keys()) == 500
    assert orb.requests[-1].n_events == count


def test_orb_deduplicates_on_idempotency_key(orb: OrbSandbox) -> None:
    events = [orb_event(f"k{i}") for i in range(4)]
    assert ingest(orb, events[:3]).status_code == 200
    # A retried batch plus one new event: the known keys are silently dropped.
    resp = ingest(orb, events)
    assert resp.status_code == 200 and resp.json() == {"validation_failed": []}
    assert [e["idempotency_key"] for e in orb.accepted()] == ["k0", "k1", "k2", "k3"]
    assert orb.duplicates == 3
    # Same key with a different body later is still a duplicate of the accepted one.
    ingest(orb, [orb_event("k0", properties={"units": 99})])
    assert orb.accepted()[0]["properties"]["units"] == 3
    assert orb.duplicates == 4


def test_orb_identical_duplicate_within_batch_is_deduplicated(orb: OrbSandbox) -> None:
    event = orb_event("same")
    resp = ingest(orb, [event, dict(event)])
    assert resp.status_code == 200
    assert len(orb.accepted()) == 1
    assert orb.duplicates == 1


def test_orb_conflicting_duplicate_within_batch_rejects_whole_batch(orb: OrbSandbox) -> None:
    resp = ingest(orb, [orb_event("ok"), orb_event("dup"), orb_event("dup", properties={"units": 4})])
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == f"{ORB_ERRORS}#400-request-validation-errors"
    assert "entire batch" in body["detail"]
    assert body["validation_errors"][0]["idempotency_key"] == "dup"
    assert orb.accepted() == []


def test_orb_conflicting_duplicate_is_400_even_in_200_mode() -> None:
    with OrbSandbox(api_key=ORB_KEY, validation_response="200") as orb:
        resp = ingest(orb, [orb_event("dup"), orb_event("dup", event_name="other")])
        assert resp.status_code == 400
        assert orb.accepted() == []


@pytest.mark.parametrize("mode", ["400", "200"], ids=["validation_response_400", "validation_response_200"])
def test_orb_validation_response_modes(mode: str) -> None:
    with OrbSandbox(api_key=ORB_KEY, validation_response=mode) as orb:
        resp = ingest(orb, [orb_event("good"), orb_event("bad", properties={"n": None})])
        expected_failure = {
            "idempotency_key": "bad",
            "validation_errors": ["Property 'n' is null; property values must be strings, numbers or booleans"],
        }
        if mode == "400":
            assert resp.status_code == 400
            assert resp.json()["validation_errors"] == [expected_failure]
            assert orb.accepted_keys() == set()
        else:
            assert resp.status_code == 200
            assert resp.json() == {"validation_failed": [expected_failure]}
            assert orb.accepted_keys() == {"good"}


def test_orb_rejects_unknown_validation_response() -> None:
    with pytest.raises(ValueError):
        OrbSandbox(validation_response="207")


def test_orb_unknown_route_and_wrong_method(orb: OrbSandbox) -> None:
    resp = requests.get(f"{orb.url}/v1/nope", headers=ORB_AUTH, timeout=5)
    assert resp.status_code == 404
    assert resp.json()["type"] == f"{ORB_ERRORS}#404-url-not-found"
    assert requests.get(f"{orb.url}/v1/ingest", headers=ORB_AUTH, timeout=5).status_code == 405


# ============================================================================ Orb: backfills


def create_backfill(orb: OrbSandbox, **body: Any) -> requests.Response:
    return requests.post(f"{orb.url}/v1/events/backfills", json=body, headers=ORB_AUTH, timeout=5)


def backfill_action(orb: OrbSandbox, backfill_id: str, action: str) -> requests.Response:
    return requests.post(f"{orb.url}/v1/events/backfills/{backfill_id}/{action}", headers=ORB_AUTH, timeout=5)


def window(start_days_ago: float, end_days_ago: float) -> dict[str, str]:
    base = now().replace(minute=0, second=0, microsecond=0)
    return {
        "timeframe_start": iso(base - timedelta(days=start_days_ago)),
        "timeframe_end": iso(base - timedelta(days=end_days_ago)),
    }


def test_backfill_create_ingest_close(orb: OrbSandbox) -> None:
    resp = create_backfill(orb, **window(4, 2), replace_existing_events=False)
    assert resp.status_code == 200
    backfill = resp.json()
    assert backfill["status"] == "pending"
    assert backfill["events_ingested"] == 0 and backfill["reverted_at"] is None
    assert backfill["customer_id"] is None and backfill["replace_existing_events"] is False
    assert set(backfill) >= {"id", "created_at", "timeframe_start", "timeframe_end", "close_time", "deprecation_filter"}

    old = orb_event("old", timestamp=iso(now() - timedelta(days=3)))
    refused = ingest(orb, [old])
    assert refused.status_code == 400
    assert "create a backfill" in refused.json()["validation_errors"][0]["validation_errors"][0]

    resp = ingest(orb, [old, dict(old)], params={"backfill_id": backfill["id"]})
    assert resp.status_code == 200 and resp.json() == {"validation_failed": []}
    assert orb.accepted() == []  # held until close
    fetched = requests.get(f"{orb.url}/v1/events/backfills/{backfill['id']}", headers=ORB_AUTH, timeout=5)
    assert fetched.json()["events_ingested"] == 1

    closed = backfill_action(orb, backfill["id"], "close")
    assert closed.status_code == 200 and closed.json()["status"] == "reflected"
    assert orb.accepted() == [old]
    assert orb.backfills()[0]["status"] == "reflected"
    # A retried close is harmless; a closed backfill accepts no more events.
    assert backfill_action(orb, backfill["id"], "close").status_code == 200
    late = ingest(
        orb, [orb_event("late", timestamp=iso(now() - timedelta(days=3)))], params={"backfill_id": backfill["id"]}
    )
    assert late.status_code == 400
    assert late.json()["type"] == f"{ORB_ERRORS}#400-constraint-violation"


def test_backfill_rejects_event_outside_timeframe(orb: OrbSandbox) -> None:
    backfill = create_backfill(orb, **window(4, 2)).json()
    outside = orb_event("x", timestamp=iso(now() - timedelta(days=5)))
    resp = ingest(orb, [outside], params={"backfill_id": backfill["id"]})
    assert resp.status_code == 400
    assert "outside the backfill's timeframe" in resp.json()["validation_errors"][0]["validation_errors"][0]


def test_backfill_rejects_event_of_other_customer(orb: OrbSandbox) -> None:
    backfill = create_backfill(orb, **window(4, 2), external_customer_id="acct_1").json()
    assert backfill["external_customer_id"] == "acct_1"
    ts = iso(now() - timedelta(days=3))
    resp = ingest(
        orb, [orb_event("x", timestamp=ts, external_customer_id="acct_2")], params={"backfill_id": backfill["id"]}
    )
    assert resp.status_code == 400
    assert ingest(orb, [orb_event("y", timestamp=ts)], params={"backfill_id": backfill["id"]}).status_code == 200


def test_backfill_unknown_id_is_404(orb: OrbSandbox) -> None:
    resp = ingest(orb, [orb_event("k")], params={"backfill_id": "bf_missing"})
    assert resp.status_code == 404
    assert resp.json()["type"] == f"{ORB_ERRORS}#404-resource-not-found"
    assert requests.get(f"{orb.url}/v1/events/backfills/bf_missing", headers=ORB_AUTH, timeout=5).status_code == 404
    assert backfill_action(orb, "bf_missing", "close").status_code == 404


def test_backfill_replace_existing_events_then_revert() -> None:
    with OrbSandbox(api_key=ORB_KEY, grace_period=timedelta(days=10)) as orb:
        ts = iso(now() - timedelta(days=3))
        live = [
            orb_event("a-old", timestamp=ts, external_customer_id="acct_a"),
            orb_event("b-old", timestamp=ts, external_customer_id="acct_b"),
            orb_event("a-recent", external_customer_id="acct_a"),
        ]
        assert ingest(orb, live).status_code == 200
        backfill = create_backfill(orb, **window(4, 2), external_customer_id="acct_a").json()
        assert backfill["replace_existing_events"] is True  # the schema default
        fixed = orb_event("a-new", timestamp=ts, external_customer_id="acct_a")
        assert ingest(orb, [fixed], params={"backfill_id": backfill["id"]}).status_code == 200

        backfill_action(orb, backfill["id"], "close")
        # Only acct_a's events inside the timeframe were replaced.
        assert orb.accepted_keys() == {"b-old", "a-recent", "a-new"}

        reverted = backfill_action(orb, backfill["id"], "revert").json()
        assert reverted["status"] == "reverted" and reverted["reverted_at"] is not None
        assert orb.accepted_keys() == {"a-old", "b-old", "a-recent"}


def test_backfill_replacement_persists_across_restart(tmp_path: Path) -> None:
    state = tmp_path / "orb.jsonl"
    ts = iso(now() - timedelta(days=3))
    with OrbSandbox(api_key=ORB_KEY, grace_period=timedelta(days=10), server=ServerOptions(state_file=state)) as orb:
        ingest(orb, [orb_event("old", timestamp=ts)])
        backfill = create_backfill(orb, **window(4, 2)).json()
        ingest(orb, [orb_event("new", timestamp=ts)], params={"backfill_id": backfill["id"]})
        backfill_action(orb, backfill["id"], "close")
        assert orb.accepted_keys() == {"new"}
    with OrbSandbox(api_key=ORB_KEY, server=ServerOptions(state_file=state)) as orb:
        assert orb.accepted_keys() == {"new"}


def test_backfill_revert_before_close_discards_events(orb: OrbSandbox) -> None:
    backfill = create_backfill(orb, **window(4, 2)).json()
    ingest(orb, [orb_event("x", timestamp=iso(now() - timedelta(days=3)))], params={"backfill_id": backfill["id"]})
    resp = backfill_action(orb, backfill["id"], "revert")
    assert resp.json()["status"] == "reverted"
    assert backfill_action(orb, backfill["id"], "revert").status_code == 200  # idempotent
    assert backfill_action(orb, backfill["id"], "close").status_code == 400
    assert orb.accepted() == []


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [
        ({}, {}, 400),
        ({"external_customer_id": "a"}, {"external_customer_id": "a"}, 400),
        ({"external_customer_id": "a"}, {}, 400),
        ({}, {"customer_id": "cus_a"}, 400),
        ({"external_customer_id": "a"}, {"external_customer_id": "b"}, 200),
    ],
    ids=[
        "account_wide_twice",
        "same_customer",
        "customer_then_account_wide",
        "account_wide_then_customer",
        "different_customers",
    ],
)
def test_backfill_overlap_rules(orb: OrbSandbox, first: dict[str, str], second: dict[str, str], status: int) -> None:
    assert create_backfill(orb, **window(6, 3), **first).status_code == 200
    resp = create_backfill(orb, **window(4, 2), **second)
    assert resp.status_code == status
    if status == 400:
        assert resp.json()["type"] == f"{ORB_ERRORS}#400-constraint-violation"
        assert "overlaps" in resp.json()["detail"]


def test_backfill_overlap_allowed_once_first_is_closed_or_adjacent(orb: OrbSandbox) -> None:
    first = create_backfill(orb, **window(6, 3)).json()
    assert create_backfill(orb, **window(3, 1)).status_code == 200  # end is exclusive: adjacent is fine
    backfill_action(orb, first["id"], "close")
    assert create_backfill(orb, **window(5, 4)).status_code == 200


@pytest.mark.parametrize(
    ("span", "status"),
    [(timedelta(days=31), 200), (timedelta(days=31, seconds=1), 400), (timedelta(0), 400), (timedelta(days=-1), 400)],
    ids=["exactly_31_days", "over_31_days", "empty_timeframe", "end_before_start"],
)
def test_backfill_duration_rules(orb: OrbSandbox, span: timedelta, status: int) -> None:
    start = now() - timedelta(days=40)
    resp = create_backfill(orb, timeframe_start=iso(start), timeframe_end=iso(start + span))
    assert resp.status_code == status
    if status == 400:
        assert resp.json()["type"] == f"{ORB_ERRORS}#400-constraint-violation"


@pytest.mark.parametrize(
    "body",
    [
        {"timeframe_start": "2024-01-01T00:00:00Z"},
        {**window(3, 2), "unknown": 1},
        {**window(3, 2), "replace_existing_events": "yes"},
        {**window(3, 2), "customer_id": "c", "external_customer_id": "e"},
    ],
    ids=["missing_timeframe_end", "extra_field", "non_boolean_replace", "both_customer_ids"],
)
def test_backfill_schema_validation(orb: OrbSandbox, body: dict[str, Any]) -> None:
    resp = create_backfill(orb, **body)
    assert resp.status_code == 400
    assert resp.json()["type"] == f"{ORB_ERRORS}#400-request-validation-errors"


def test_backfill_list_is_newest_first_and_paginated(orb: OrbSandbox) -> None:
    ids = [create_backfill(orb, **window(10 - 2 * i, 9 - 2 * i)).json()["id"] for i in range(3)]
    url = f"{orb.url}/v1/events/backfills"
    page = requests.get(url, params={"limit": 2}, headers=ORB_AUTH, timeout=5).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["pagination_metadata"]["has_more"] is True
    cursor = page["pagination_metadata"]["next_cursor"]
    rest = requests.get(url, params={"limit": 2, "cursor": cursor}, headers=ORB_AUTH, timeout=5).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]]
    assert rest["pagination_metadata"] == {"has_more": False, "next_cursor": None}
    assert [b["id"] for b in orb.backfills()] == ids
    assert requests.get(url, headers={}, timeout=5).status_code == 401


def test_backfill_auto_closes_at_close_time(orb: OrbSandbox) -> None:
    close_at = now() + timedelta(seconds=0.5)
    backfill = create_backfill(orb, **window(4, 2), close_time=iso(close_at)).json()
    ingest(orb, [orb_event("x", timestamp=iso(now() - timedelta(days=3)))], params={"backfill_id": backfill["id"]})
    assert orb.accepted() == []
    assert wait_until(lambda: orb.accepted_keys() == {"x"})
    assert orb.backfills()[0]["status"] == "reflected"


# ============================================================================ Orb: reading events back


HOUR = timedelta(hours=1)


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def volume(orb: OrbSandbox, **params: Any) -> requests.Response:
    return requests.get(f"{orb.url}/v1/events/volume", params=params, headers=ORB_AUTH, timeout=5)


def search(orb: OrbSandbox, **body: Any) -> requests.Response:
    return requests.post(f"{orb.url}/v1/events/search", json=body, headers=ORB_AUTH, timeout=5)


@pytest.fixture
def history_orb() -> Iterator[OrbSandbox]:
    """Orb holding events in three hours, two and five hours ago: 2, 0, 0, 1 per hour."""
    with OrbSandbox(api_key=ORB_KEY, grace_period=timedelta(days=30)) as sandbox:
        base = hour_of(now()) - 5 * HOUR
        stamps = {"a": base + timedelta(minutes=1), "b": base + timedelta(minutes=59, seconds=59),
                  "c": base + 3 * HOUR}
        assert ingest(sandbox, [orb_event(k, timestamp=iso(t)) for k, t in stamps.items()]).status_code == 200
        yield sandbox


def test_orb_volume_counts_events_in_the_hour_of_their_timestamp_listing_empty_hours(history_orb: OrbSandbox) -> None:
    base = hour_of(now()) - 5 * HOUR
    late = orb_event("late", timestamp=iso(base + timedelta(minutes=30)))  # arrives now, counts 5 hours ago
    assert ingest(history_orb, [late]).status_code == 200
    resp = volume(history_orb, timeframe_start=iso(base), timeframe_end=iso(base + 4 * HOUR))
    assert resp.status_code == 200
    assert resp.json()["data"] == [
        {"timeframe_start": iso(base + n * HOUR).replace(".000000", ""),
         "timeframe_end": iso(base + (n + 1) * HOUR).replace(".000000", ""), "count": count}
        for n, count in enumerate([3, 0, 0, 1])]
    assert resp.json()["pagination_metadata"] == {"has_more": False, "next_cursor": None}


@pytest.mark.parametrize(
    ("start", "end", "hours"),
    [(timedelta(minutes=30), 4 * HOUR, 4), (timedelta(0), 3 * HOUR + timedelta(minutes=1), 4),
     (timedelta(0), 3 * HOUR, 3)],
    ids=["start_inside_an_hour_includes_it", "end_inside_an_hour_includes_it", "aligned_end_is_exclusive"],
)
def test_orb_volume_widens_a_timeframe_to_whole_hours(
    history_orb: OrbSandbox, start: timedelta, end: timedelta, hours: int
) -> None:
    base = hour_of(now()) - 5 * HOUR
    data = volume(history_orb, timeframe_start=iso(base + start), timeframe_end=iso(base + end)).json()["data"]
    assert len(data) == hours and data[0]["timeframe_start"] == iso(base).replace(".000000", "")
    assert sum(item["count"] for item in data) == (3 if hours == 4 else 2)


def test_orb_volume_is_paginated_with_a_cursor(history_orb: OrbSandbox) -> None:
    base = hour_of(now()) - 5 * HOUR
    pages, cursor = [], None
    while True:
        body = volume(history_orb, timeframe_start=iso(base), timeframe_end=iso(base + 5 * HOUR), limit=2,
                      **({"cursor": cursor} if cursor else {})).json()
        pages.append([item["count"] for item in body["data"]])
        cursor = body["pagination_metadata"]["next_cursor"]
        if not body["pagination_metadata"]["has_more"]:
            break
    assert pages == [[2, 0], [0, 1], [0]]


def test_orb_volume_end_defaults_to_now_and_page_size_to_20(history_orb: OrbSandbox) -> None:
    body = volume(history_orb, timeframe_start=iso(now() - 30 * HOUR)).json()
    assert len(body["data"]) == 20 and body["pagination_metadata"]["has_more"] is True


@pytest.mark.parametrize(
    "params",
    [{}, {"timeframe_start": "yesterday"}, {"timeframe_start": "2026-01-02T00:00:00Z", "limit": 101},
     {"timeframe_start": "2026-01-02T00:00:00Z", "limit": 0},
     {"timeframe_start": "2026-01-02T00:00:00Z", "timeframe_end": "2026-01-01T00:00:00Z"}],
    ids=["missing_timeframe_start", "unparseable_start", "limit_over_100", "limit_zero", "end_before_start"],
)
def test_orb_volume_refuses_bad_parameters(orb: OrbSandbox, params: dict[str, Any]) -> None:
    resp = volume(orb, **params)
    assert resp.status_code == 400
    assert resp.json()["type"] == f"{ORB_ERRORS}#400-request-validation-errors"


def test_orb_volume_leaves_out_events_a_replacing_backfill_replaced() -> None:
    with OrbSandbox(api_key=ORB_KEY, grace_period=timedelta(days=10)) as orb:
        stamp = hour_of(now() - timedelta(days=3))
        ingest(orb, [orb_event("old-1", timestamp=iso(stamp)), orb_event("old-2", timestamp=iso(stamp))])
        backfill = create_backfill(orb, **window(4, 2)).json()
        ingest(orb, [orb_event("new", timestamp=iso(stamp))], params={"backfill_id": backfill["id"]})
        backfill_action(orb, backfill["id"], "close")
        data = volume(orb, timeframe_start=iso(stamp), timeframe_end=iso(stamp + HOUR)).json()["data"]
        assert [item["count"] for item in data] == [1]
        assert [e["id"] for e in search(orb, event_ids=["old-1", "new"],
                                        timeframe_start=iso(stamp - HOUR)).json()["data"]] == ["new"]


def test_orb_search_finds_held_events_by_id_case_sensitively(history_orb: OrbSandbox) -> None:
    resp = search(history_orb, event_ids=["a", "A", "c", "never-sent"])
    assert resp.status_code == 200
    (a, c) = resp.json()["data"]
    assert (a["id"], c["id"]) == ("a", "c")
    assert set(a) == {"id", "customer_id", "external_customer_id", "event_name", "properties", "timestamp",
                      "deprecated"}
    assert a["external_customer_id"] == "acct_1" and a["customer_id"] is None and a["deprecated"] is False
    assert search(history_orb, event_ids=["never-sent"]).json() == {"data": []}, "no 404: an empty list"


@pytest.mark.parametrize(
    ("start", "end", "found"),
    [(None, None, {"a", "b", "c"}), (2, None, {"c"}), (None, 1, {"a", "b"}), (-200, 6, {"a", "b", "c"}),
     (-200, -190, set())],
    ids=["default_last_week", "start_excludes_earlier", "end_is_exclusive", "explicit_wider_timeframe",
         "older_than_the_events"],
)
def test_orb_search_finds_only_events_inside_its_timeframe(
    history_orb: OrbSandbox, start: int | None, end: int | None, found: set[str]
) -> None:
    """``start``/``end``: hours after the first event's hour (None: the default)."""
    base = hour_of(now()) - 5 * HOUR
    body: dict[str, Any] = {"event_ids": ["a", "b", "c"]}
    if start is not None:
        body["timeframe_start"] = iso(base + start * HOUR)
    if end is not None:
        body["timeframe_end"] = iso(base + end * HOUR)
    assert {e["id"] for e in search(history_orb, **body).json()["data"]} == found


@pytest.mark.parametrize(
    "body",
    [{"event_ids": []}, {"event_ids": [f"k{i}" for i in range(501)]}, {"event_ids": "a"}, {"event_ids": [1]},
     {}, {"event_ids": ["a"], "customer_id": "c"}, {"event_ids": ["a"], "timeframe_start": "soon"}],
    ids=["no_ids", "over_500_ids", "ids_not_a_list", "id_not_a_string", "missing_event_ids", "extra_field",
         "unparseable_timeframe"],
)
def test_orb_search_refuses_bad_criteria(orb: OrbSandbox, body: dict[str, Any]) -> None:
    resp = search(orb, **body)
    assert resp.status_code == 400
    assert resp.json()["type"] == f"{ORB_ERRORS}#400-request-validation-errors"


def test_orb_search_takes_exactly_500_ids_and_refuses_an_empty_timeframe(history_orb: OrbSandbox) -> None:
    ids = ["a", *(f"k{i}" for i in range(499))]
    assert [e["id"] for e in search(history_orb, event_ids=ids).json()["data"]] == ["a"]
    empty = search(history_orb, event_ids=["a"], timeframe_start=iso(now()), timeframe_end=iso(now() - HOUR))
    assert empty.status_code == 400 and empty.json()["type"] == f"{ORB_ERRORS}#400-constraint-violation"


def test_orb_read_endpoints_need_the_api_key(orb: OrbSandbox) -> None:
    assert requests.get(f"{orb.url}/v1/events/volume", params={"timeframe_start": iso(now())},
                        timeout=5).status_code == 401
    assert requests.post(f"{orb.url}/v1/events/search", json={"event_ids": ["a"]}, timeout=5).status_code == 401


def test_a_deleted_event_is_lost_until_its_key_is_sent_again(history_orb: OrbSandbox) -> None:
    assert history_orb.delete_events(["a", "never-sent"]) == 1
    assert history_orb.accepted_keys() == {"b", "c"}
    assert search(history_orb, event_ids=["a"]).json()["data"] == []
    base = hour_of(now()) - 5 * HOUR
    assert volume(history_orb, timeframe_start=iso(base), timeframe_end=iso(base + HOUR)).json()["data"][0][
        "count"] == 1
    assert ingest(history_orb, [orb_event("a", timestamp=iso(base + timedelta(minutes=1)))]).status_code == 200
    assert history_orb.accepted_keys() == {"a", "b", "c"} and history_orb.duplicates == 0


def test_events_are_deleted_through_the_control_endpoint_too(history_orb: OrbSandbox) -> None:
    resp = requests.post(f"{history_orb.url}/_sandbox/delete_events", json={"keys": ["b", "c"]}, timeout=5)
    assert resp.json() == {"ok": True, "deleted": 2}
    assert history_orb.accepted_keys() == {"a"}
    bad = requests.post(f"{history_orb.url}/_sandbox/delete_events", json={"keys": "b"}, timeout=5)
    assert bad.status_code == 400


# ============================================================================ Orb: hot paths
# The ingest path has fast paths (msgspec parsing, a cheap validity check, canonical texts only for
# repeated keys, counting events from the parsed body); they must answer exactly like the slow ones.


def test_orb_conflicting_duplicate_found_as_2nd_and_500th_event(orb: OrbSandbox) -> None:
    events = [orb_event(f"k{i}") for i in range(500)]
    events[499] = orb_event("k1", properties={"units": 4})
    resp = ingest(orb, events)
    assert resp.status_code == 400
    assert [e["idempotency_key"] for e in resp.json()["validation_errors"]] == ["k1"]
    assert orb.accepted() == [] and orb.requests[-1].n_events == 500


def test_orb_identical_duplicate_as_2nd_and_500th_event_is_deduplicated(orb: OrbSandbox) -> None:
    events = [orb_event(f"k{i}") for i in range(500)]
    events[499] = dict(events[1])
    assert ingest(orb, events).status_code == 200
    assert len(orb.accepted()) == 499 and orb.duplicates == 1


def test_orb_conflicts_are_listed_in_order_and_type_sensitive(orb: OrbSandbox) -> None:
    a, b, c = orb_event("a", properties={"units": 1}), orb_event("b"), orb_event("c")
    events = [a, b, c, {**b, "event_name": "other"}, {**a, "properties": {"units": 1.0}}, dict(c)]
    # {"units": 1.0} == {"units": 1} in Python, but the JSON bodies differ.
    resp = ingest(orb, events)
    assert resp.status_code == 400
    assert [e["idempotency_key"] for e in resp.json()["validation_errors"]] == ["b", "a"]


def _orb_variants(now_: datetime) -> list[Any]:
    """Valid events and one-field mutations of them, for comparing the fast and the full check."""
    base = orb_event("k", properties={"s": "x", "i": 1, "f": 0.5, "b": True})
    values: list[Any] = [None, "", "  ", "x", 7, 1.5, True, [], {}, [1], {"a": 1}]
    timestamps = [
        iso(now_),
        iso(now_ + FUTURE_TOLERANCE),
        iso(now_ + FUTURE_TOLERANCE + timedelta(microseconds=1)),
        iso(now_ - timedelta(hours=12)),
        iso(now_ - timedelta(hours=12, microseconds=1)),
        now_.replace(microsecond=0).isoformat(),
        now_.strftime("%Y-%m-%dT%H:%M:%S+02:00"),
        iso(now_)[:-1],
        now_.strftime("%Y-%m-%d"),
        "2026-02-30T00:00:00Z",
        "yesterday",
    ]
    properties = [*values, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, float("inf"), float("nan"), -0.0]
    variants: list[Any] = [base, [base], "event", None]
    for name in [*EVENT_FIELDS, "extra"]:
        variants.append(without(base, name))
        variants.extend({**base, name: value} for value in values)
    variants.extend({**base, "timestamp": value} for value in timestamps)
    variants.extend({**base, "properties": {"p": value}} for value in properties)
    variants.extend({**base, "properties": {"ok": 1, "p": value}} for value in properties)
    variants.append({**without(base, "external_customer_id"), "customer_id": "cus_1"})
    variants.append({**base, "customer_id": None})
    variants.append({**base, "customer_id": "cus_1", "external_customer_id": None})
    return variants


def test_orb_fast_validity_check_agrees_with_full_validation(orb: OrbSandbox) -> None:
    now_ = now()
    variants = _orb_variants(now_)
    window = (now_ - orb.grace_period, now_ + FUTURE_TOLERANCE)
    verdicts = [_plainly_valid(event, *window) for event in variants]
    assert verdicts == [orb._event_errors(event, now_, None) == [] for event in variants]
    assert sum(verdicts) > 20  # the fast path does take the valid ones


def test_orb_request_log_counts_events_of_parsed_and_unparsed_bodies(orb: OrbSandbox) -> None:
    def post(data: bytes, headers: dict[str, str] = ORB_AUTH) -> int:
        resp = requests.post(f"{orb.url}/v1/ingest", data=data, headers=headers, timeout=5)
        record = orb.requests[-1]
        assert record.status == resp.status_code
        return record.n_events

    three = json.dumps({"events": [orb_event(f"k{i}") for i in range(3)]}).encode()
    assert post(three) == 3
    assert post(three, {"Authorization": "Bearer wrong"}) == 3
    # Refused before parsing: counted leniently, as before (Python's json reads NaN).
    assert post(b'{"events": [{"v": NaN}, {}]}', {"Authorization": "Bearer wrong"}) == 2
    assert post(b'{"events": [{"v": NaN}, {}]}') == 0
    assert post(b'{"events": [{}, {}') == 0
    assert post(b"[{}, {}]") == 0
    assert post(b'{"events": [{}, {}], "debug": true}') == 2
    assert post(b'{"events": [{}, {}, {}, {}]}') == 4
    orb.inject(Fault.TOO_MANY_REQUESTS)
    assert post(three) == 3 and orb.requests[-1].fault == "too_many_requests"


def test_orb_json_numbers_keep_their_python_types(orb: OrbSandbox) -> None:
    properties = {"i": 1, "f": 1.0, "e": 1e-7, "max": 2**63 - 1, "min": -(2**63), "z": -0.0}
    assert ingest(orb, [orb_event("k", properties=properties)]).status_code == 200
    accepted = orb.accepted()[0]["properties"]
    assert accepted == properties
    assert {name: type(value) for name, value in accepted.items()} == {
        name: type(value) for name, value in properties.items()
    }


@pytest.mark.parametrize(
    ("literal", "status", "message"),
    [
        (b"1e400", 400, "Property 'v' must be a finite number"),  # json reads it as inf
        (b"123456789012345678901234567890", 400, "does not fit in a 64-bit signed integer"),
        (b'"\\ud800"', 200, None),  # a lone surrogate escape: json accepts it
        (b"Infinity", 400, "request body is not valid JSON: Infinity is not valid JSON"),
        (b"-Infinity", 400, "request body is not valid JSON: -Infinity is not valid JSON"),
        (b'"\xff"', 400, "request body is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    ],
    ids=["float_overflow", "huge_int", "lone_surrogate", "infinity", "minus_infinity", "invalid_utf8"],
)
def test_orb_body_parsing_matches_python_json(
    orb: OrbSandbox, literal: bytes, status: int, message: str | None
) -> None:
    event = json.dumps(orb_event("k", properties={"v": "PLACEHOLDER"})).encode()
    data = b'{"events": [' + event.replace(b'"PLACEHOLDER"', literal) + b"]}"
    resp = requests.post(f"{orb.url}/v1/ingest", data=data, headers=ORB_AUTH, timeout=5)
    assert resp.status_code == status, resp.text
    if message is not None:
        assert message in resp.text


def test_orb_timestamp_cache_keeps_only_the_parse() -> None:
    two_hours_ago = iso(now() - timedelta(hours=2))
    with OrbSandbox(api_key=ORB_KEY) as lenient, OrbSandbox(api_key=ORB_KEY, grace_period=timedelta(hours=1)) as strict:
        assert ingest(lenient, [orb_event("k", timestamp=two_hours_ago)]).status_code == 200
        resp = ingest(strict, [orb_event("k", timestamp=two_hours_ago)])
        assert resp.status_code == 400 and "account grace period" in resp.text
    for _ in range(2):  # failures are not cached: raised again, with the same message
        with pytest.raises(ValueError, match="not a valid ISO 8601 date-time"):
            parse_timestamp("2026-02-30T00:00:00Z")
    assert parse_timestamp(two_hours_ago) is parse_timestamp(two_hours_ago)


# ============================================================================ Orb: customers


def customer(orb: OrbSandbox, external_id: str) -> requests.Response:
    return requests.get(f"{orb.url}/v1/customers/external_customer_id/{requests.utils.quote(external_id, safe='')}",
                        headers=ORB_AUTH, timeout=5)


def test_orb_customers_by_external_id_exist_once_created() -> None:
    with OrbSandbox(api_key=ORB_KEY, customers={"cus_acme"}) as orb:
        found = customer(orb, "cus_acme")
        assert found.status_code == 200 and found.json()["external_customer_id"] == "cus_acme"
        missing = customer(orb, "cus new/ü")
        assert missing.status_code == 404 and missing.json()["type"] == f"{ORB_ERRORS}#404-resource-not-found"
        orb.add_customers("cus new/ü")
        assert customer(orb, "cus new/ü").status_code == 200


def test_orb_customers_need_the_api_key(orb: OrbSandbox) -> None:
    resp = requests.get(f"{orb.url}/v1/customers/external_customer_id/cus_acme", timeout=5)
    assert resp.status_code == 401


def test_orb_without_a_customer_list_knows_every_customer(orb: OrbSandbox) -> None:
    assert customer(orb, "anyone").status_code == 200
