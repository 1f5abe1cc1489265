"""What the sandbox tests share: events as each API takes them, requests over loopback HTTP, and a
running Orb and Kable sandbox per test."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from usage_billing.sandbox import KableSandbox, OrbSandbox

ORB_KEY = "orb-test-key"
ORB_AUTH = {"Authorization": f"Bearer {ORB_KEY}"}
KABLE_ID = "kci_test"
KABLE_SECRET = "kable-sandbox-key"
KABLE_AUTH = {"KABLE-CLIENT-ID": KABLE_ID, "KABLE-CLIENT-SECRET": KABLE_SECRET}
ORB_ERRORS = "https://docs.withorb.com/reference/error-responses"
KABLE_CREATE = "/api/v1/events/create"


def iso(dt: datetime) -> str:
    """RFC 3339 / ISO 8601 UTC with a Z suffix."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> datetime:
    return datetime.now(UTC)


def orb_event(key: str, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_name": "api_call",
        "idempotency_key": key,
        "timestamp": iso(now() - timedelta(minutes=1)),
        "properties": {"units": 3, "region": "eu", "trial": False, "ratio": 0.5},
        "external_customer_id": "acct_1",
    }
    event.update(overrides)
    return event


def without(event: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in fields}


def kable_event(txn: str | None, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "clientId": "customer_1",
        "timestamp": iso(now()),
        "data": {"calls": 1, "endpoint": "/v1/things"},
    }
    if txn is not None:
        event["transactionId"] = txn
    event.update(overrides)
    return event


def ingest(
    orb: OrbSandbox,
    events: list[dict[str, Any]],
    *,
    session: requests.Session | None = None,
    params: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> requests.Response:
    poster = session or requests
    return poster.post(
        f"{orb.url}/v1/ingest",
        json={"events": events},
        headers=ORB_AUTH,
        params=params,
        timeout=timeout,
    )


def kable_post(kable: KableSandbox, body: Any, *, timeout: float = 5.0) -> requests.Response:
    return requests.post(f"{kable.url}{KABLE_CREATE}", json=body, headers=KABLE_AUTH, timeout=timeout)


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def orb() -> Iterator[OrbSandbox]:
    with OrbSandbox(api_key=ORB_KEY) as sandbox:
        yield sandbox


@pytest.fixture
def kable() -> Iterator[KableSandbox]:
    with KableSandbox(client_id=KABLE_ID, api_key=KABLE_SECRET) as sandbox:
        yield sandbox
