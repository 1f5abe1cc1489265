"""Kable's usage-events API over the HTTP provider: ``POST /api/v1/events/create``.

Connection ``kable_default`` (HTTP): host = ``https://live.kable.io`` or ``https://test.kable.io``,
login = Kable client ID (``kci_...``), password = API key (``sk_live...`` / ``sk_test...``), sent
as the ``KABLE-CLIENT-ID`` / ``KABLE-CLIENT-SECRET`` headers. Contract (kable-openapi.yaml,
kable-api-notes.md):

* a JSON array of events, at most 500 per request (Kable documents no limit; its SDKs use 500);
* 200: every event recorded (``transactionId`` de-duplicates replays);
* 400: Kable names no failing event, so the delivery core bisects the batch;
* 429 / 5xx: retried whole; 401: the task fails.

Kable's ``X-REQUEST-ID`` response header is logged for every failed request so support can trace it.
"""

from __future__ import annotations

import requests

from billing_airflow.hooks.base import BillingApiHook


class KableHook(BillingApiHook):
    """Delivers batches of Kable events."""

    conn_name_attr = "kable_conn_id"
    default_conn_name = "kable_default"
    hook_name = "Kable"
    endpoint = "api/v1/events/create"
    destination = "kable"

    def auth_headers(self, login: str | None, password: str | None) -> dict[str, str]:
        if not login or not password:
            raise ValueError(f"connection {self.http_conn_id!r}: set the Kable client ID as the login "
                             f"and the API key as the password")
        return {"KABLE-CLIENT-ID": login, "KABLE-CLIENT-SECRET": password}

    def error_message(self, response: requests.Response) -> str:
        message = super().error_message(response)
        request_id = response.headers.get("X-REQUEST-ID")
        if request_id:
            self.log.warning("kable: HTTP %s, X-REQUEST-ID %s", response.status_code, request_id)
            message += f" (X-REQUEST-ID {request_id})"
        return message
