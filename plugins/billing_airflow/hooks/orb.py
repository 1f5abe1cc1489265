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
"""

from __future__ import annotations

import requests

from billing_airflow.hooks.base import BillingApiHook
from usage_billing.delivery import BatchOutcome, BatchRejected


class OrbHook(BillingApiHook):
    """Delivers batches of Orb events; ``backfill_id`` ties them to an Orb backfill."""

    conn_name_attr = "orb_conn_id"
    default_conn_name = "orb_default"
    hook_name = "Orb"
    endpoint = "v1/ingest"
    destination = "orb"

    backfill_id: str | None = None

    def auth_headers(self, login: str | None, password: str | None) -> dict[str, str]:
        if not password:
            raise ValueError(f"connection {self.http_conn_id!r}: set the Orb API key as the password")
        return {"Authorization": f"Bearer {password}"}

    def payload(self, events: list[dict]) -> object:
        return {"events": events}

    def query(self) -> dict[str, str]:
        return {"backfill_id": self.backfill_id} if self.backfill_id else {}

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

    def refused(self, response: requests.Response, events: list[dict], keys: list[str]) -> BatchOutcome:
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
            outcome = outcome.merge(self.send([e for e, _ in rest], [k for _, k in rest]))
        return outcome
