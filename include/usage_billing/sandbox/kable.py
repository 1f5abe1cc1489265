"""A local imitation of Kable's usage-event API (``POST /api/v1/events/create``).

Behaviour follows Kable's OpenAPI specs and docs as summarised in ``kable-api-notes.md`` §2-3:

* Auth by the ``KABLE-CLIENT-ID`` and ``KABLE-CLIENT-SECRET`` headers (names are
  case-insensitive); anything else is 401 ``{"message": "Unauthorized"}``.
* Every response, errors included, carries a fresh ``X-REQUEST-ID`` (uuid4), which is also
  stored on the :class:`~usage_billing.sandbox.server.RequestRecord`.
* The body is a JSON array of events, or a single event object (the readme's "an event or
  list"). Each event needs a non-empty string ``clientId`` and an RFC 3339 ``timestamp``;
  ``transactionId`` (string) and ``data`` (object) are optional; other fields are tolerated,
  as Kable's own SDKs send ``kableClientId`` and ``library``.
* Kable documents no per-event errors, so any invalid event rejects the whole request with
  400 ``{"message": "invalid input, object invalid: event[3]: clientId is required"}`` and
  nothing is recorded.
* Events are de-duplicated on ``transactionId``; events without one are always recorded.

Sandbox assumptions (Kable documents neither): at most 500 events per request, the cap Kable's
Node and Python SDKs enforce; and a 429 fault answers ``{"message": "Too Many Requests"}``.
"""

from __future__ import annotations

import functools
import hmac
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from usage_billing.sandbox.server import (
    BadBody,
    Fault,
    FaultPlan,
    IngestResult,
    Response,
    SandboxServer,
    ServerOptions,
    parse_json,
)

#: Assumed per-request cap (Kable's Node/Python SDKs never send more than 500 events).
MAX_EVENTS_PER_REQUEST = 500

INVALID = "invalid input, object invalid"

# RFC 3339 date-time: seconds required, offset or Z required.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _timestamp_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"timestamp must be an RFC 3339 date-time such as 2022-01-09T09:32:01Z, got {value!r}"
    return _text_timestamp_problem(value)


@functools.lru_cache(maxsize=4096)
def _text_timestamp_problem(text: str) -> str | None:
    """The verdict on a timestamp string, memoised: it does not depend on the clock."""
    if not _RFC3339.match(text):
        return f"timestamp must be an RFC 3339 date-time such as 2022-01-09T09:32:01Z, got {text!r}"
    try:
        datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    except ValueError:
        return f"timestamp {text!r} is not a valid date-time"
    return None


def _event_problems(event: Any) -> list[str]:
    """Problems with one event (empty when valid)."""
    if not isinstance(event, dict):
        return ["event must be a JSON object"]
    problems = []
    client_id = event.get("clientId")
    if client_id is None:
        problems.append("clientId is required")
    elif not isinstance(client_id, str) or not client_id.strip():
        problems.append("clientId must be a non-empty string")
    if event.get("timestamp") is None:
        problems.append("timestamp is required")
    else:
        problem = _timestamp_problem(event["timestamp"])
        if problem:
            problems.append(problem)
    txn = event.get("transactionId")
    if txn is not None and (not isinstance(txn, str) or not txn.strip()):
        problems.append("transactionId must be a non-empty string")
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        problems.append("data must be a JSON object")
    return problems


class KableSandbox(SandboxServer):
    """Local Kable: ``POST /api/v1/events/create`` on 127.0.0.1.

    Example::

        with KableSandbox(client_id="kci_test", api_key="kable-sandbox-key") as kable:
            requests.post(f"{kable.url}/api/v1/events/create", json=[...],
                          headers={"KABLE-CLIENT-ID": "kci_test",
                                   "KABLE-CLIENT-SECRET": "kable-sandbox-key"})
    """

    name = "kable"
    ingest_paths = frozenset({"/api/v1/events/create", "/api/v1/events/create/"})
    request_id_header = "X-REQUEST-ID"
    key_field = "transactionId"

    def __init__(
        self,
        client_id: str = "kci_test",
        api_key: str = "kable-sandbox-key",
        *,
        max_events: int = MAX_EVENTS_PER_REQUEST,
        server: ServerOptions = ServerOptions(),
    ) -> None:
        """Configure the sandbox (see :class:`~usage_billing.sandbox.server.SandboxServer`).

        Args:
            client_id: the expected ``KABLE-CLIENT-ID``.
            api_key: the expected ``KABLE-CLIENT-SECRET``.
            max_events: per-request event cap (the sandbox's assumption: 500).
            server: latency, seed, state file, port (:class:`~usage_billing.sandbox.server.ServerOptions`).
        """
        super().__init__(server)
        self.client_id = client_id
        self.api_key = api_key
        self.max_events = int(max_events)

    def _new_request_id(self) -> str | None:
        return str(uuid.uuid4())

    def _fault_response(self, plan: FaultPlan) -> Response:
        if plan.kind is Fault.TOO_MANY_REQUESTS:
            resp = Response(429, {"message": "Too Many Requests"})
            if plan.retry_after is not None:
                resp.headers["Retry-After"] = (
                    plan.retry_after if isinstance(plan.retry_after, str) else format(plan.retry_after, "g")
                )
            return resp
        if plan.kind is Fault.BAD_REQUEST:
            return Response(400, {"message": INVALID})
        return Response(plan.status or 500, {"message": "Something went wrong"})

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        client_id = headers.get("KABLE-CLIENT-ID") or ""
        secret = headers.get("KABLE-CLIENT-SECRET") or ""
        # Evaluate both comparisons so timing does not reveal which header was wrong.
        ok_id = hmac.compare_digest(client_id.encode(), self.client_id.encode())
        ok_secret = hmac.compare_digest(secret.encode(), self.api_key.encode())
        return ok_id and ok_secret

    def _ingest(self, headers: Mapping[str, str], path: str, query: dict[str, list[str]], raw: bytes) -> IngestResult:
        if not self._authorized(headers):
            return IngestResult(Response(401, {"message": "Unauthorized"}), self._count_events(raw))
        try:
            body = parse_json(raw)
        except BadBody as exc:
            return IngestResult(Response(400, {"message": f"{INVALID}: {exc}"}), 0)
        if isinstance(body, dict):
            events = [body]
        elif isinstance(body, list):
            events = body
        else:
            return IngestResult(
                Response(400, {"message": f"{INVALID}: body must be an event object or an array of events"}),
                0,
            )
        n_events = len(events)
        if n_events > self.max_events:
            return IngestResult(
                Response(
                    400,
                    {"message": f"{INVALID}: {n_events} events in one request exceeds the limit of {self.max_events}"},
                ),
                n_events,
            )
        problems = [
            f"event[{index}]: {problem}" for index, event in enumerate(events) for problem in _event_problems(event)
        ]
        if problems:
            return IngestResult(Response(400, {"message": f"{INVALID}: " + "; ".join(problems)}), n_events)
        with self._lock:
            self._accept(events)
        return IngestResult(Response(200, {"message": "Events successfully recorded"}), n_events)
