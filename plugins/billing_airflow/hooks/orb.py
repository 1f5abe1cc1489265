"""Orb's ingestion API over the HTTP provider: ``POST /v1/ingest``.

Connection ``orb_default`` (HTTP): host = API base URL (``https://api.withorb.com``), password =
API key, sent as ``Authorization: Bearer``. Contract (Orb's OpenAPI ``/ingest``):

* at most 500 events per request;
* 200: accepted; events listed in ``validation_failed`` are rejected with Orb's messages;
* 400: at least one event failed validation and nothing was ingested. When Orb names the failing
  idempotency keys, those are rejected and the rest are re-sent at once (Orb did not mark them
  processed); otherwise the delivery core bisects the batch;
* 429 / 5xx: retried whole (safe: Orb ingests each idempotency key at most once);
* 401 / 404: the task fails (credentials or URL are wrong).

Reading back what Orb holds (reconciliation): ``GET /v1/events/volume`` (hourly counts by event
timestamp, followed page by page) and ``POST /v1/events/search`` (at most 500 idempotency keys per
request), through the same retries and pacing as every other call.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from billing_airflow.hooks.base import BillingApiHook, RetryableResponse, describe
from usage_billing.delivery.contract import BatchOutcome, BatchRejected, FatalDeliveryError, TransientDeliveryError


class OrbHook(BillingApiHook):
    """Delivers batches of Orb events; ``backfill_id`` ties them to an Orb backfill."""

    conn_name_attr = "orb_conn_id"
    default_conn_name = "orb_default"
    hook_name = "Orb"
    endpoint = "v1/ingest"
    destination = "orb"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._customers: dict[str, bool] = {}

    def auth_headers(self, login: str | None, password: str | None) -> dict[str, str]:
        if not password:
            raise ValueError(f"connection {self.http_conn_id!r}: set the Orb API key as the password")
        return {"Authorization": f"Bearer {password}"}

    def payload(self, events: list[dict]) -> object:
        return {"events": events}

    def query(self, backfill_id: str | None = None) -> dict[str, str]:
        return {"backfill_id": backfill_id} if backfill_id else {}

    @staticmethod
    def _failures(items: object) -> dict[str, str]:
        failures: dict[str, str] = {}
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("idempotency_key"):
                errors = item.get("validation_errors") or ["validation failed"]
                failures[str(item["idempotency_key"])] = "; ".join(str(e) for e in errors)
        return failures

    def accepted(self, response: requests.Response, events: list[dict], keys: list[str]) -> BatchOutcome:
        try:
            failures = self._failures(response.json().get("validation_failed"))
        except (ValueError, AttributeError):
            failures = {}
        return BatchOutcome(accepted=[k for k in keys if k not in failures],
                            rejected={k: v for k, v in failures.items() if k in set(keys)})

    def refused(self, response: requests.Response, events: list[dict], keys: list[str],
                backfill_id: str | None = None) -> BatchOutcome:
        try:
            body = response.json()
        except ValueError:
            body = {}
        failures = {k: v for k, v in self._failures(body.get("validation_errors") if isinstance(body, dict)
                                                    else None).items() if k in set(keys)}
        if not failures:
            raise BatchRejected(self.error_message(response), response.status_code)
        # Orb named the bad events; the others were not ingested and are re-sent with their keys.
        rest = [(e, k) for e, k in zip(events, keys, strict=True) if k not in failures]
        outcome = BatchOutcome(rejected=failures)
        if rest:
            outcome = outcome.merge(self.send([e for e, _ in rest], [k for _, k in rest], backfill_id))
        return outcome

    # -- reading back (usage_billing.reconcile.EventReader) ------------------------------------------------

    #: Orb's cap on ``event_ids`` per search request (``EventSearchCriteria.maxItems``).
    SEARCH_CHUNK = 500
    #: Hours per volume page: the spec's maximum ``limit``, so a week is two requests.
    VOLUME_PAGE = 100

    def event_volume(self, start: datetime, end: datetime) -> dict[datetime, int]:
        """Orb's event count per UTC hour (by event timestamp) for the hours of ``[start, end)``.

        Hours Orb does not list count as zero. Orb widens an unaligned bound to the hour it falls in,
        so callers pass whole hours."""
        counts: dict[datetime, int] = {}
        params: dict[str, object] = {"timeframe_start": _iso(start), "timeframe_end": _iso(end),
                                     "limit": self.VOLUME_PAGE}
        while True:
            self.pacer.acquire(0)  # a request, no events
            status, body = self.call_json("GET", "v1/events/volume", params=params)
            if status != 200 or not isinstance(body, dict):
                raise FatalDeliveryError(f"orb: reading event volume for [{_iso(start)}, {_iso(end)}) failed: "
                                         f"HTTP {status}: {_detail(body)}")
            for bucket in body.get("data") or []:
                hour = _time(bucket["timeframe_start"]).astimezone(UTC)
                counts[hour] = counts.get(hour, 0) + int(bucket.get("count") or 0)
            # The spec's EventVolumes has no pagination_metadata; a page without it is the last one.
            meta = body.get("pagination_metadata") or {}
            if not meta.get("has_more") or not meta.get("next_cursor"):
                return counts
            params = {**params, "cursor": meta["next_cursor"]}

    def search_events(self, keys: Sequence[str], start: datetime, end: datetime) -> set[str]:
        """The idempotency keys among ``keys`` that Orb holds with a timestamp in ``[start, end)``.

        Searched 500 keys per request (Orb's cap). Deprecated events (replaced by a backfill) do not
        count as held; amended ones cannot be searched by id at all (the spec says so), which a
        pipeline that never amends does not meet."""
        found: set[str] = set()
        unique = list(dict.fromkeys(keys))
        # Orb's default timeframe is the last week: always say which one is meant.
        window = {"timeframe_start": _iso(start), "timeframe_end": _iso_ceil(end)}
        for offset in range(0, len(unique), self.SEARCH_CHUNK):
            chunk = unique[offset:offset + self.SEARCH_CHUNK]
            self.pacer.acquire(0)
            status, body = self.call_json("POST", "v1/events/search", json={"event_ids": chunk, **window})
            if status != 200 or not isinstance(body, dict):
                raise FatalDeliveryError(f"orb: searching {len(chunk)} events in [{_iso(start)}, {_iso(end)}) failed: "
                                         f"HTTP {status}: {_detail(body)}")
            asked = set(chunk)
            found.update(str(event["id"]) for event in body.get("data") or []
                         if isinstance(event, dict) and event.get("id") in asked and not event.get("deprecated"))
        return found

    # -- backfills (usage_billing.delivery.contract.BackfillApi) -----------------------------------------------

    def customer_exists(self, external_id: str) -> bool:
        """Whether Orb has a customer with this external id (``GET /v1/customers/external_customer_id/{id}``).

        Orb accepts events of an unknown external customer and bills them only once such a customer
        exists with a matching subscription; the core asks before sending. Answers are cached for the
        task (a customer created meanwhile is seen by the next run), and the calls are paced and
        retried like every request."""
        with self._lock:
            if external_id in self._customers:
                return self._customers[external_id]
        self.pacer.acquire(1)
        endpoint = f"/v1/customers/external_customer_id/{urllib.parse.quote(external_id, safe='')}"
        retrying = self._retrying()
        try:
            response = retrying(self.request, "GET", endpoint)
        except (RetryableResponse, requests.ConnectionError, requests.Timeout) as error:
            raise TransientDeliveryError(f"orb: customer lookup: {describe(error)}") from None
        if response.status_code == 404:
            exists = False
        elif response.ok:
            exists = True
        else:
            raise FatalDeliveryError(f"orb: customer lookup: {self.error_message(response)} "
                                     f"(check the connection {self.http_conn_id!r})")
        with self._lock:
            self._customers[external_id] = exists
        return exists

    def open_backfill(self, start: datetime, end: datetime, replace: bool) -> dict:
        """Create a pending backfill for ``[start, end)``; reuse a pending one that covers it.

        Orb refuses a backfill overlapping another pending one. Callers hold the day's lock, so a
        pending overlap is a backfill left open by a task that died: reuse it when it covers the
        timeframe with the same replace flag, otherwise close it (its events are real deliveries
        the ledger will re-send with the same keys) and create ours.
        """
        body = {"timeframe_start": _iso(start), "timeframe_end": _iso(end), "replace_existing_events": replace}
        for _ in range(3):
            status, created = self.call_json("POST", "v1/events/backfills", json=body)
            if status == 200 and isinstance(created, dict):
                return created
            pending = [b for b in self.pending_backfills() if _overlaps(b, start, end)]
            covering = [b for b in pending
                        if _covers(b, start, end) and bool(b.get("replace_existing_events")) == replace]
            if covering:
                self.log.info("orb: reusing pending backfill %s", covering[0]["id"])
                return covering[0]
            if not pending:
                raise FatalDeliveryError(f"orb: cannot create a backfill for [{_iso(start)}, {_iso(end)}): "
                                         f"{_detail(created)}")
            for stale in pending:
                self.log.warning("orb: closing pending backfill %s that overlaps [%s, %s)", stale["id"],
                                 _iso(start), _iso(end))
                self.close_backfill(stale["id"])
        raise TransientDeliveryError(f"orb: backfills for [{_iso(start)}, {_iso(end)}) keep overlapping")

    def close_backfill(self, backfill_id: str) -> dict:
        status, body = self.call_json("POST", f"v1/events/backfills/{backfill_id}/close")
        if status != 200 or not isinstance(body, dict):
            raise TransientDeliveryError(f"orb: closing backfill {backfill_id} failed: {_detail(body)}")
        return body

    def pending_backfills(self) -> list[dict]:
        found, cursor = [], None
        while True:
            status, body = self.call_json("GET", "v1/events/backfills",
                                          params={"limit": 100, **({"cursor": cursor} if cursor else {})})
            if status != 200 or not isinstance(body, dict):
                raise TransientDeliveryError(f"orb: listing backfills failed: {_detail(body)}")
            found += [b for b in body.get("data", []) if b.get("status") in ("pending", "pending_revert")]
            meta = body.get("pagination_metadata") or {}
            cursor = meta.get("next_cursor")
            if not meta.get("has_more") or not cursor:
                return found


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_ceil(moment: datetime) -> str:
    """An exclusive end in whole seconds that still covers ``moment``'s own second's fraction."""
    return _iso(moment + timedelta(seconds=1) if moment.microsecond else moment)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _overlaps(backfill: dict, start: datetime, end: datetime) -> bool:
    return _time(backfill["timeframe_start"]) < end and start < _time(backfill["timeframe_end"])


def _covers(backfill: dict, start: datetime, end: datetime) -> bool:
    return _time(backfill["timeframe_start"]) <= start and end <= _time(backfill["timeframe_end"])


def _detail(body: object) -> str:
    return str(body.get("detail") or body.get("title") or body) if isinstance(body, dict) else str(body)
