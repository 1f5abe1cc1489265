"""The Kable sandbox (``usage_billing.sandbox.kable``) over real loopback HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.unit.sandbox.conftest import (
    KABLE_AUTH,
    KABLE_CREATE,
    KABLE_ID,
    KABLE_SECRET,
    iso,
    kable_event,
    kable_post,
    now,
    without,
)
from usage_billing.sandbox import Fault, KableSandbox

pytestmark = pytest.mark.timeout(60)


def test_kable_accepts_array_and_dedups_on_transaction_id(kable: KableSandbox) -> None:
    events = [kable_event("t1"), kable_event("t2")]
    resp = kable_post(kable, events)
    assert resp.status_code == 200
    assert resp.json() == {"message": "Events successfully recorded"}
    assert kable_post(kable, [*events, kable_event("t3")]).status_code == 200
    assert [e["transactionId"] for e in kable.accepted()] == ["t1", "t2", "t3"]
    assert kable.accepted_keys() == {"t1", "t2", "t3"}
    assert kable.duplicates == 2
    assert kable.url.startswith("http://127.0.0.1:")


def test_kable_events_without_transaction_id_are_always_recorded(kable: KableSandbox) -> None:
    event = kable_event(None)
    kable_post(kable, [event])
    kable_post(kable, [event])
    assert len(kable.accepted()) == 2 and kable.accepted_keys() == set() and kable.duplicates == 0


def test_kable_accepts_single_object_body(kable: KableSandbox) -> None:
    event = kable_event("solo", kableClientId=KABLE_ID, library={"name": "x", "version": "1"})
    resp = kable_post(kable, event)
    assert resp.status_code == 200
    assert kable.accepted() == [event]
    assert kable.requests[-1].n_events == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"KABLE-CLIENT-ID": KABLE_ID},
        {"KABLE-CLIENT-SECRET": KABLE_SECRET},
        {"KABLE-CLIENT-ID": "kci_other", "KABLE-CLIENT-SECRET": KABLE_SECRET},
        {"KABLE-CLIENT-ID": KABLE_ID, "KABLE-CLIENT-SECRET": "sk_live.wrong"},
        {"Authorization": f"Bearer {KABLE_SECRET}"},
    ],
    ids=["no_headers", "missing_secret", "missing_client_id", "wrong_client_id", "wrong_secret", "bearer_instead"],
)
def test_kable_rejects_bad_auth(kable: KableSandbox, headers: dict[str, str]) -> None:
    resp = requests.post(f"{kable.url}{KABLE_CREATE}", json=[kable_event("t")], headers=headers, timeout=5)
    assert resp.status_code == 401
    assert resp.json() == {"message": "Unauthorized"}
    assert resp.headers.get("X-REQUEST-ID")
    assert kable.accepted() == []


def test_kable_auth_header_names_are_case_insensitive(kable: KableSandbox) -> None:
    headers = {"kable-client-id": KABLE_ID, "Kable-Client-Secret": KABLE_SECRET}
    resp = requests.post(f"{kable.url}{KABLE_CREATE}", json=[kable_event("t")], headers=headers, timeout=5)
    assert resp.status_code == 200


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (lambda: without(kable_event("t"), "clientId"), "clientId is required"),
        (lambda: kable_event("t", clientId=""), "clientId must be a non-empty string"),
        (lambda: kable_event("t", clientId=42), "clientId must be a non-empty string"),
        (lambda: without(kable_event("t"), "timestamp"), "timestamp is required"),
        (lambda: kable_event("t", timestamp="09/01/2022"), "RFC 3339"),
        (lambda: kable_event("t", timestamp="2022-01-09T09:32:01"), "RFC 3339"),
        (lambda: kable_event("t", timestamp="2022-13-09T09:32:01Z"), "not a valid date-time"),
        (lambda: kable_event("t", transactionId=123), "transactionId must be a non-empty string"),
        (lambda: kable_event("t", data=[1, 2]), "data must be a JSON object"),
        (lambda: "not an event", "event must be a JSON object"),
    ],
    ids=[
        "missing_client_id",
        "empty_client_id",
        "numeric_client_id",
        "missing_timestamp",
        "non_rfc3339_timestamp",
        "timestamp_without_offset",
        "impossible_month",
        "numeric_transaction_id",
        "data_not_object",
        "event_not_object",
    ],
)
def test_kable_invalid_event_rejects_whole_request_naming_index(
    kable: KableSandbox, bad: Callable[[], Any], problem: str
) -> None:
    resp = kable_post(kable, [kable_event("ok1"), kable_event("ok2"), bad()])
    assert resp.status_code == 400
    message = resp.json()["message"]
    assert message.startswith("invalid input, object invalid: event[2]: ")
    assert problem in message
    assert kable.accepted() == []


def test_kable_accepts_rfc3339_offsets(kable: KableSandbox) -> None:
    events = [
        kable_event("a", timestamp="2022-01-09T09:32:01Z"),
        kable_event("b", timestamp="2022-01-09T09:32:01.123+02:00"),
    ]
    assert kable_post(kable, events).status_code == 200


@pytest.mark.parametrize(
    ("data", "fragment"),
    [(b"{oops", "not valid JSON"), (b'"just a string"', "event object or an array")],
    ids=["malformed_json", "scalar_body"],
)
def test_kable_rejects_malformed_body(kable: KableSandbox, data: bytes, fragment: str) -> None:
    resp = requests.post(f"{kable.url}{KABLE_CREATE}", data=data, headers=KABLE_AUTH, timeout=5)
    assert resp.status_code == 400
    assert fragment in resp.json()["message"]


@pytest.mark.parametrize(("count", "status"), [(500, 200), (501, 400)], ids=["exactly_500", "over_500"])
def test_kable_500_event_cap(kable: KableSandbox, count: int, status: int) -> None:
    resp = kable_post(kable, [kable_event(f"t{i}") for i in range(count)])
    assert resp.status_code == status
    assert len(kable.accepted()) == (count if status == 200 else 0)


def test_kable_request_id_on_every_response(kable: KableSandbox) -> None:
    responses = [
        kable_post(kable, [kable_event("t")]),  # 200
        kable_post(kable, [{"timestamp": iso(now())}]),  # 400
        requests.post(f"{kable.url}{KABLE_CREATE}", json=[], timeout=5),  # 401
        requests.get(f"{kable.url}/api/v1/unknown", headers=KABLE_AUTH, timeout=5),  # 404
    ]
    kable.inject(Fault.TOO_MANY_REQUESTS)
    kable.inject(Fault.SERVER_ERROR, status=503)
    responses += [kable_post(kable, [kable_event("t")]), kable_post(kable, [kable_event("t")])]
    responses.append(requests.get(f"{kable.url}/_sandbox/health", timeout=5))
    assert [r.status_code for r in responses] == [200, 400, 401, 404, 429, 503, 200]
    ids = [r.headers.get("X-REQUEST-ID") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids)
    # The log (API requests only, not control endpoints) carries the same ids.
    assert [r.request_id for r in kable.requests] == ids[:-1]


@pytest.mark.parametrize(
    ("kind", "kwargs", "status", "message"),
    [
        (Fault.TOO_MANY_REQUESTS, {"retry_after": 3}, 429, "Too Many Requests"),
        (Fault.SERVER_ERROR, {"status": 502}, 502, "Something went wrong"),
        (Fault.BAD_REQUEST, {}, 400, "invalid input, object invalid"),
    ],
    ids=["429", "502", "bad_request"],
)
def test_kable_http_error_faults(
    kable: KableSandbox, kind: Fault, kwargs: dict[str, Any], status: int, message: str
) -> None:
    kable.inject(kind, **kwargs)
    resp = kable_post(kable, [kable_event("t")])
    assert resp.status_code == status and resp.json() == {"message": message}
    if kind is Fault.TOO_MANY_REQUESTS:
        assert resp.headers["Retry-After"] == "3"
    assert kable.accepted() == []


@pytest.mark.parametrize(
    ("kind", "accepted"), [(Fault.RESET, set()), (Fault.LOST_RESPONSE, {"t"})], ids=["reset", "lost_response"]
)
def test_kable_connection_faults(kable: KableSandbox, kind: Fault, accepted: set[str]) -> None:
    kable.inject(kind)
    with pytest.raises(requests.ConnectionError):
        kable_post(kable, [kable_event("t")])
    assert kable.accepted_keys() == accepted
    assert kable.requests[-1].fault == kind.value


# ============================================================================ Kable: hot paths


def test_kable_request_log_counts_events_of_parsed_and_unparsed_bodies(kable: KableSandbox) -> None:
    three = [kable_event(f"t{i}") for i in range(3)]
    requests.post(f"{kable.url}{KABLE_CREATE}", json=three, headers={}, timeout=5)
    kable_post(kable, three)
    requests.post(f"{kable.url}{KABLE_CREATE}", data=b"[{oops", headers=KABLE_AUTH, timeout=5)
    kable_post(kable, [kable_event("x"), kable_event("y", clientId="")])
    assert [(r.status, r.n_events) for r in kable.requests] == [(401, 3), (200, 3), (400, 0), (400, 2)]


def test_kable_timestamp_verdicts_repeat(kable: KableSandbox) -> None:
    messages = [kable_post(kable, [kable_event("t", timestamp="2022-13-09T09:32:01Z")]).json() for _ in range(2)]
    assert messages[0] == messages[1] and "not a valid date-time" in messages[0]["message"]
    events = [kable_event(f"t{i}", timestamp="2022-01-09T09:32:01Z") for i in range(3)]
    assert kable_post(kable, events).status_code == 200
