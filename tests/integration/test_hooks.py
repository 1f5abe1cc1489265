"""The destination hooks against the sandboxes: response contracts, attribution, bisection, auth."""

from __future__ import annotations

import json

import pytest

from billing_airflow.hooks.kable import KableHook
from billing_airflow.hooks.orb import OrbHook
from tests.integration.conftest import FAST_RETRIES, KABLE_CLIENT, KABLE_KEY, ORB_KEY
from usage_billing.delivery.contract import BatchRejected, FatalDeliveryError, TransientDeliveryError
from usage_billing.delivery.sending import send_resolving
from usage_billing.destinations.kable import KableSettings
from usage_billing.destinations.orb import OrbSettings
from usage_billing.sandbox import Fault, KableSandbox, OrbSandbox

ORB_SETTINGS = OrbSettings(external_customer_id_field="userId", properties_mapping={}, **FAST_RETRIES)


def orb_event(key: str, **overrides) -> dict:
    return {"event_name": "API Call", "idempotency_key": key, "external_customer_id": "cus_1",
            "timestamp": "2099-01-01T00:00:00.000Z" if key == "future" else _now(), "properties": {"n": 1},
            **overrides}


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@pytest.fixture
def orb_hook(monkeypatch, request):
    with OrbSandbox(api_key=ORB_KEY, validation_response=getattr(request, "param", "400")) as sandbox:
        monkeypatch.setenv("AIRFLOW_CONN_ORB_TEST", json.dumps({"conn_type": "http", "host": sandbox.url,
                                                               "password": ORB_KEY}))
        with OrbHook("orb_test", ORB_SETTINGS, sleep=lambda _: None) as hook:
            yield hook, sandbox


@pytest.mark.parametrize("orb_hook", ["400", "200"], indirect=True, ids=["orb-answers-400", "orb-answers-200"])
def test_orb_names_the_bad_events_and_the_rest_are_delivered(orb_hook):
    hook, sandbox = orb_hook
    events = [orb_event("a"), orb_event("nested", properties={"x": {"y": 1}}), orb_event("b"), orb_event("future")]
    outcome = hook.send(events, [e["idempotency_key"] for e in events])
    assert sorted(outcome.accepted) == ["a", "b"]
    assert set(outcome.rejected) == {"nested", "future"}
    assert sandbox.accepted_keys() == {"a", "b"}
    assert all(outcome.rejected.values())


def test_orb_bearer_auth_and_a_wrong_key_is_fatal(orb_hook, monkeypatch):
    hook, sandbox = orb_hook
    monkeypatch.setenv("AIRFLOW_CONN_ORB_WRONG", json.dumps({"conn_type": "http", "host": sandbox.url,
                                                            "password": "wrong-key"}))
    with OrbHook("orb_wrong", ORB_SETTINGS) as wrong, pytest.raises(FatalDeliveryError) as error:
        wrong.send([orb_event("a")], ["a"])
    assert "orb_wrong" in str(error.value) and "wrong-key" not in str(error.value)
    assert hook.session().headers["Authorization"] == f"Bearer {ORB_KEY}"
    assert hook.session().auth is None


def test_retries_count_the_sends_with_zero_wait(orb_hook):
    hook, sandbox = orb_hook
    sandbox.inject(Fault.TOO_MANY_REQUESTS, times=3, retry_after=7)
    sleeps: list[float] = []
    hook._sleep = sleeps.append
    outcome = hook.send([orb_event("a")], ["a"])
    assert outcome.retries == 3 and sleeps == [7, 7, 7]
    assert len(sandbox.requests) == 4


@pytest.fixture
def kable_hook(monkeypatch):
    with KableSandbox(client_id=KABLE_CLIENT, api_key=KABLE_KEY) as sandbox:
        monkeypatch.setenv("AIRFLOW_CONN_KABLE_TEST", json.dumps({"conn_type": "http", "host": sandbox.url,
                                                                 "login": KABLE_CLIENT, "password": KABLE_KEY}))
        with KableHook("kable_test", KableSettings(**FAST_RETRIES), sleep=lambda _: None) as hook:
            yield hook, sandbox


def kable_event(key: str, **overrides) -> dict:
    return {"clientId": "cus_1", "timestamp": _now(), "transactionId": key, "data": {"n": 1}, **overrides}


def test_kable_refuses_a_whole_batch_and_bisection_isolates_the_bad_event(kable_hook):
    hook, sandbox = kable_hook
    events = [kable_event(f"k{i}") for i in range(7)] + [kable_event("bad", clientId="")]
    keys = [e["transactionId"] for e in events]
    with pytest.raises(BatchRejected, match="X-REQUEST-ID"):
        hook.send(events, keys)
    outcome = send_resolving(hook, events, keys)
    assert sorted(outcome.accepted) == sorted(keys[:-1]) and list(outcome.rejected) == ["bad"]
    assert "clientId" in outcome.rejected["bad"] and outcome.bisections >= 3
    assert sandbox.accepted_keys() == set(keys[:-1])


def test_kable_sends_its_headers_and_no_basic_auth(kable_hook):
    hook, _ = kable_hook
    headers = hook.session().headers
    assert headers["KABLE-CLIENT-ID"] == KABLE_CLIENT and headers["KABLE-CLIENT-SECRET"] == KABLE_KEY
    assert headers["Accept"] == headers["Content-Type"] == "application/json"
    assert hook.session().auth is None
    assert hook.url_from_endpoint(hook.endpoint).endswith("/api/v1/events/create")


def test_default_backoff_spans_several_rate_limit_windows(orb_hook, monkeypatch):
    """With the shipped defaults, persistent 429s are retried for minutes, not three times in a second."""
    _, sandbox = orb_hook
    sandbox.inject(Fault.TOO_MANY_REQUESTS, times=100)
    sleeps: list[float] = []
    with OrbHook("orb_test", OrbSettings(external_customer_id_field="userId", properties_mapping={}),
                 sleep=sleeps.append) as default_hook:
        with pytest.raises(TransientDeliveryError, match="gave up after 8 attempts"):
            default_hook.send([orb_event("a")], ["a"])
    assert len(sleeps) == 7
    for attempt, slept in enumerate(sleeps):  # initial 1 s doubling, plus up to 1 s of jitter, capped at 60 s
        assert min(2**attempt, 60) <= slept <= min(2**attempt + 1, 60), sleeps
    assert sum(sleeps) > 120, "the retries span more than two one-minute rate-limit windows"
    assert len({round(s, 3) for s in sleeps}) == len(sleeps), "jittered"
    assert not sandbox.accepted_keys()


# -- reading back what Orb holds (reconciliation) ------------------------------------------------------------


def test_orb_event_volume_follows_every_page_and_counts_by_event_hour(monkeypatch):
    from datetime import UTC, datetime, timedelta

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = hour - timedelta(hours=149)
    with OrbSandbox(api_key=ORB_KEY, grace_period=timedelta(days=10)) as sandbox:
        monkeypatch.setenv("AIRFLOW_CONN_ORB_TEST", json.dumps({"conn_type": "http", "host": sandbox.url,
                                                               "password": ORB_KEY}))
        stamps = {"first": start, "middle-1": start + timedelta(hours=99, minutes=59),
                  "middle-2": start + timedelta(hours=99, minutes=1), "last": hour + timedelta(minutes=1)}
        events = [orb_event(k, timestamp=t.strftime("%Y-%m-%dT%H:%M:%S.000Z")) for k, t in stamps.items()]
        with OrbHook("orb_test", ORB_SETTINGS, sleep=lambda _: None) as hook:
            hook.send(events, list(stamps))
            counts = hook.event_volume(start, hour + timedelta(hours=1))
        volume_requests = [r for r in sandbox.requests if r.path == "/v1/events/volume"]
    assert len(counts) == 150 and sum(counts.values()) == 4
    assert counts[start] == 1 and counts[start + timedelta(hours=99)] == 2 and counts[hour] == 1
    assert [("cursor=" in r.query) for r in volume_requests] == [False, True], "two pages of 100 hours"


def test_orb_search_events_asks_500_keys_at_a_time_within_the_timeframe(orb_hook, monkeypatch):
    from datetime import UTC, datetime, timedelta

    hook, sandbox = orb_hook
    held = [orb_event(f"held-{n}") for n in range(3)]
    hook.send(held, [e["idempotency_key"] for e in held])
    now = datetime.now(UTC)
    keys = [f"absent-{n}" for n in range(1198)] + [e["idempotency_key"] for e in held]
    assert hook.search_events(keys, now - timedelta(hours=1), now + timedelta(minutes=1)) == {"held-0", "held-1",
                                                                                              "held-2"}
    assert len([r for r in sandbox.requests if r.path == "/v1/events/search"]) == 3, "500 + 500 + 201 keys"
    assert hook.search_events(keys, now - timedelta(days=2), now - timedelta(days=1)) == set(), "outside the window"
    monkeypatch.setattr(OrbHook, "SEARCH_CHUNK", 501)  # more than Orb takes: Orb's 400 fails the call
    with pytest.raises(FatalDeliveryError, match="between 1 and 500"):
        hook.search_events(keys, now - timedelta(hours=1), now)
