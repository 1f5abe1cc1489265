"""A local imitation of Orb's event-ingestion API (``POST /v1/ingest``, backfills, and the two read
endpoints reconciliation uses: ``GET /v1/events/volume`` and ``POST /v1/events/search``).

Behaviour follows Orb's OpenAPI spec (``IngestRequestBody``/``IngestEvent``,
``IngestionResponse``, ``RequestValidationError``, ``NewBackfill``/``Backfill``) and the
research notes in ``orb-api-notes.md`` §1-4:

* Bearer-token auth; 401 with an RFC 7807 body that never echoes the key.
* ``{"events": [...]}`` with at most 500 events (Orb's documented per-request cap).
* Per-event validation of the ``IngestEvent`` schema plus Orb's rules: UTC timestamps, at most
  5 minutes in the future, not older than ``now - grace_period`` (unless ingested into a
  pending backfill), flat string/number/boolean properties with integers that fit int64,
  exactly one of ``customer_id`` / ``external_customer_id``.
* Two events with the same ``idempotency_key`` but different bodies reject the whole batch.
* With ``validation_response="400"`` (default, per the spec) any invalid event rejects the whole
  request and nothing is ingested; with ``"200"`` valid events are ingested and the failures
  are listed in ``validation_failed`` (older observed behaviour).
* Already-ingested keys are silently de-duplicated.
* ``GET /v1/events/volume`` (``EventVolumes``): hourly UTC buckets of the held events by their
  ``timestamp`` (a late event counts in its own hour), ``timeframe_start`` required and widened to
  the hour it falls in, ``timeframe_end`` (default now) to the end of its hour; every hour of the
  timeframe is listed, zero counts included, oldest first, ``limit`` 1-100 (default 20) per page.
* ``POST /v1/events/search`` (``EventSearchCriteria`` -> ``Events``): the held events whose id (the
  idempotency key, case-sensitive) is among ``event_ids`` (1 to 500; 400 otherwise) and whose
  timestamp lies in ``[timeframe_start, timeframe_end)`` (default: one week ago to now). No 404 for
  no match: an empty ``data``.

Sandbox simplifications (documented deviations from the real service):

* There is no customer registry: any ``customer_id`` is accepted.
* Closing and reverting backfills complete synchronously (``pending`` -> ``reflected``,
  ``reflected`` -> ``reverted``); ``pending_revert`` is never observed. A backfill whose
  ``close_time`` has passed is closed lazily on the next request or accessor call.
* ``deprecation_filter`` is stored and echoed but not evaluated: a replacing backfill removes
  every event in its timeframe and customer scope.
* The volume response adds ``pagination_metadata`` (``has_more``, ``next_cursor``) as Orb's other
  paginated lists do; the spec's ``EventVolumes`` schema lists only ``data`` but the endpoint takes a
  ``cursor`` and is documented as a paginated list.
* Nothing is ever deprecated or amended: a replacing backfill removes the events it replaces (Orb
  keeps them, deprecated). So every event volume counts and search returns is a live one, as Orb
  counts them, and ``deprecated`` is always false.
* Backfills live in memory only; ``state_file`` persists accepted events (and removals made by
  replacing backfills), not pending backfills.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import re
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from usage_billing.sandbox.server import (
    BadBody,
    Fault,
    FaultPlan,
    IngestResult,
    Response,
    SandboxServer,
    ServerOptions,
    canonical,
    count_events,
    parse_json,
    utcnow,
)

ERROR_DOCS = "https://docs.withorb.com/reference/error-responses"
TYPE_VALIDATION = f"{ERROR_DOCS}#400-request-validation-errors"
TYPE_CONSTRAINT = f"{ERROR_DOCS}#400-constraint-violation"
TYPE_AUTH = f"{ERROR_DOCS}#401-authentication-error"
TYPE_NOT_FOUND = f"{ERROR_DOCS}#404-resource-not-found"
TYPE_URL_NOT_FOUND = f"{ERROR_DOCS}#404-url-not-found"
TYPE_TOO_MANY = f"{ERROR_DOCS}#429-too-many-requests"
TYPE_SERVER = f"{ERROR_DOCS}#500-internal-server-error"

#: Orb's documented default per-request event cap.
MAX_EVENTS_PER_REQUEST = 500
#: Timestamps further ahead than this are rejected.
FUTURE_TOLERANCE = timedelta(minutes=5)
#: Orb's default maximum backfill duration.
MAX_BACKFILL_DURATION = timedelta(days=31)
#: ``close_time`` default: creation time plus one day.
DEFAULT_BACKFILL_CLOSE_AFTER = timedelta(days=1)
#: ``POST /v1/events/search``: at most this many ``event_ids`` per request.
MAX_SEARCH_IDS = 500
#: ``POST /v1/events/search``: the timeframe's start when none is given.
DEFAULT_SEARCH_WINDOW = timedelta(weeks=1)
HOUR = timedelta(hours=1)
SEARCH_FIELDS = frozenset({"event_ids", "timeframe_start", "timeframe_end"})

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_ZERO_OFFSET = timedelta(0)

EVENT_FIELDS = frozenset(
    {"event_name", "timestamp", "properties", "idempotency_key", "customer_id", "external_customer_id"}
)
NEW_BACKFILL_FIELDS = frozenset(
    {
        "timeframe_start",
        "timeframe_end",
        "replace_existing_events",
        "close_time",
        "customer_id",
        "external_customer_id",
        "deprecation_filter",
    }
)

# ISO 8601 date-time (date-only strings are dates, not timestamps); offset optional so a naive
# value can be told apart from an unparseable one in the error message.
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}(:?\d{2})?)?$")

_BACKFILL_PATH = re.compile(r"^/v1/events/backfills/([^/]+)(?:/(close|revert))?/?$")
_CUSTOMER_PATH = re.compile(r"^/v1/customers/external_customer_id/([^/]+)/?$")


def problem(status: int, type_: str, title: str, detail: str, **extra: Any) -> Response:
    """Build an RFC 7807 error response the way Orb shapes them."""
    body = {"type": type_, "status": status, "title": title, "detail": detail}
    body.update(extra)
    return Response(status, body)


def parse_timestamp(value: Any, *, require_utc: bool = True) -> datetime:
    """Parse an ISO 8601 date-time string.

    With ``require_utc`` the value must carry ``Z`` or a zero offset; otherwise a naive value
    is read as UTC and any offset is converted.

    Raises:
        ValueError: with an Orb-style message.
    """
    if require_utc and isinstance(value, str):
        return _parse_utc_timestamp(value)
    return _parse_timestamp(value, require_utc)


@functools.lru_cache(maxsize=4096)
def _parse_utc_timestamp(text: str) -> datetime:
    """``parse_timestamp(text)``, memoised: the events of a batch often share timestamps.

    Only the parse is cached, never a verdict against "now"; failures are not cached at all
    (``lru_cache`` does not store exceptions), and datetimes are immutable.
    """
    return _parse_timestamp(text, True)


def _parse_timestamp(value: Any, require_utc: bool) -> datetime:
    # Wrong JSON type and bad text are both "invalid value" to the client: one exception type.
    text = value if isinstance(value, str) else None
    try:
        if text is None or not _ISO_DATETIME.match(text):
            raise ValueError
        parsed = datetime.fromisoformat(text)
    except ValueError:
        if text is None:
            raise ValueError("timestamp must be an ISO 8601 date-time string") from None
        raise ValueError(f"Timestamp '{text}' is not a valid ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        if require_utc:
            raise ValueError(
                f"Timestamp '{value}' has no timezone designator; it must be in UTC (a 'Z' suffix or a +00:00 offset)"
            )
        return parsed.replace(tzinfo=UTC)
    if require_utc and parsed.utcoffset() != _ZERO_OFFSET:
        raise ValueError(f"Timestamp '{value}' must be in UTC (a 'Z' suffix or a +00:00 offset), not a local offset")
    return parsed.astimezone(UTC)


def format_time(value: datetime | None) -> str | None:
    """Render a datetime the way the sandbox returns them (UTC, ``Z`` suffix)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _property_errors(properties: Any) -> list[str]:
    if not isinstance(properties, dict):
        return ["properties must be an object whose values are strings, numbers or booleans"]
    errors = []
    for name, value in properties.items():
        if value is None:
            errors.append(f"Property '{name}' is null; property values must be strings, numbers or booleans")
        elif isinstance(value, dict):
            errors.append(f"Property '{name}' is an object; nested dictionaries are disallowed")
        elif isinstance(value, list):
            errors.append(f"Property '{name}' is an array; property values must be strings, numbers or booleans")
        elif isinstance(value, (bool, str)):
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                errors.append(f"Property '{name}' value {value} does not fit in a 64-bit signed integer")
        elif isinstance(value, float):
            if not math.isfinite(value):
                errors.append(f"Property '{name}' must be a finite number")
        else:  # pragma: no cover - JSON cannot produce other types
            errors.append(f"Property '{name}' has an unsupported type")
    return errors


def _plainly_valid(event: Any, earliest: datetime, latest: datetime) -> bool:
    """Cheap check that an event outside any backfill is valid, ``earliest <= timestamp <= latest``.

    Only ever ``True`` when :meth:`OrbSandbox._event_errors` would find no error; ``False``
    means "look closer", so the full check (and its messages) stays the authority.
    """
    if type(event) is not dict or not event.keys() <= EVENT_FIELDS:
        return False
    name, key = event.get("event_name"), event.get("idempotency_key")
    if type(name) is not str or type(key) is not str or not name.strip() or not key.strip():
        return False
    cid, ext = event.get("customer_id"), event.get("external_customer_id")
    if (cid is None) == (ext is None):
        return False
    customer = ext if cid is None else cid
    if type(customer) is not str or not customer.strip():
        return False
    properties = event.get("properties")
    if type(properties) is not dict:
        return False
    for value in properties.values():
        kind = type(value)
        if kind is int:
            if not INT64_MIN <= value <= INT64_MAX:
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is not str and kind is not bool:
            return False
    try:
        timestamp = parse_timestamp(event.get("timestamp"))
    except ValueError:
        return False
    return earliest <= timestamp <= latest


def _hour_of(moment: datetime) -> datetime:
    """The UTC hour a moment falls in (Orb's volume buckets)."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _customer_of(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """The event's customer attribution as ``(field, value)``, if it has exactly one."""
    cid, ext = event.get("customer_id"), event.get("external_customer_id")
    if isinstance(cid, str) and ext is None:
        return ("customer_id", cid)
    if isinstance(ext, str) and cid is None:
        return ("external_customer_id", ext)
    return None


@dataclass
class _Backfill:
    id: str
    created_at: datetime
    timeframe_start: datetime
    timeframe_end: datetime
    close_time: datetime
    replace_existing_events: bool
    scope: tuple[str, str] | None
    deprecation_filter: str | None
    status: str = "pending"
    reverted_at: datetime | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    # Set on close, used to undo it on revert.
    added_keys: list[str] = field(default_factory=list)
    replaced: list[dict[str, Any]] = field(default_factory=list)

    def covers(self, ts: datetime) -> bool:
        return self.timeframe_start <= ts < self.timeframe_end

    def in_scope(self, event: Mapping[str, Any]) -> bool:
        return self.scope is None or _customer_of(event) == self.scope

    def to_json(self) -> dict[str, Any]:
        scope_field, scope_value = self.scope or (None, None)
        return {
            "id": self.id,
            "status": self.status,
            "created_at": format_time(self.created_at),
            "timeframe_start": format_time(self.timeframe_start),
            "timeframe_end": format_time(self.timeframe_end),
            "events_ingested": len(self.events),
            "close_time": format_time(self.close_time),
            "reverted_at": format_time(self.reverted_at),
            "customer_id": scope_value if scope_field == "customer_id" else None,
            # Not in Orb's Backfill schema (Orb resolves aliases to its own customer id, which
            # the sandbox cannot): without it an alias-scoped backfill would look account-wide.
            "external_customer_id": scope_value if scope_field == "external_customer_id" else None,
            "replace_existing_events": self.replace_existing_events,
            "deprecation_filter": self.deprecation_filter,
        }


class OrbSandbox(SandboxServer):
    """Local Orb: ``POST /v1/ingest`` plus ``/v1/events/backfills`` on 127.0.0.1.

    Example::

        with OrbSandbox(api_key="orb-test-key") as orb:
            requests.post(f"{orb.url}/v1/ingest", json={"events": [...]},
                          headers={"Authorization": "Bearer orb-test-key"})
            assert orb.accepted_keys() == {...}
    """

    name = "orb"
    ingest_paths = frozenset({"/v1/ingest", "/v1/ingest/"})
    key_field = "idempotency_key"

    def __init__(
        self,
        api_key: str = "orb-test-key",
        grace_period: timedelta = timedelta(hours=12),
        *,
        validation_response: str | int = "400",
        max_events: int = MAX_EVENTS_PER_REQUEST,
        customers: Iterable[str] | None = None,
        server: ServerOptions = ServerOptions(),
    ) -> None:
        """Configure the sandbox (see :class:`~usage_billing.sandbox.server.SandboxServer`).

        Args:
            api_key: the only bearer token accepted.
            grace_period: how late an event may arrive outside a backfill.
            validation_response: ``"400"`` rejects a request with any invalid event (the
                spec's behaviour); ``"200"`` ingests the valid events and lists the failures
                in ``validation_failed``.
            max_events: per-request event cap (Orb's default is 500).
            customers: the external customer ids that exist in the account (``GET
                /v1/customers/external_customer_id/{id}`` answers 404 for others); None: every
                customer exists. Ingest accepts events of unknown customers either way, as Orb does.
            server: latency, seed, state file, port (:class:`~usage_billing.sandbox.server.ServerOptions`).
        """
        super().__init__(server)
        mode = str(validation_response)
        if mode not in ("400", "200"):
            raise ValueError('validation_response must be "400" or "200"')
        self.api_key = api_key
        self.grace_period = grace_period
        self.validation_response = mode
        self.max_events = int(max_events)
        self._backfills: dict[str, _Backfill] = {}
        self._customers: set[str] | None = None if customers is None else set(customers)

    def add_customers(self, *external_ids: str) -> None:
        """Create customers (as Orb's Create customer endpoint would), for tests and demos."""
        with self._lock:
            if self._customers is not None:
                self._customers.update(external_ids)

    # ------------------------------------------------------------------ public accessors

    def backfills(self) -> list[dict[str, Any]]:
        """All backfills as Orb ``Backfill`` dicts, oldest first."""
        with self._lock:
            self._tick()
            return [bf.to_json() for bf in self._backfills.values()]

    # ------------------------------------------------------------------ hooks

    def _reset_vendor_state(self) -> None:
        self._backfills = {}

    def _control_extra(self) -> dict[str, Any]:
        return {"backfills": [bf.to_json() for bf in self._backfills.values()]}

    def _tick(self) -> None:
        now = utcnow()
        for bf in self._backfills.values():
            if bf.status == "pending" and bf.close_time <= now:
                self._close(bf, now)

    def _not_found(self, path: str) -> Response:
        return problem(404, TYPE_URL_NOT_FOUND, "URL not found", f"No route for {path}")

    def _fault_response(self, plan: FaultPlan) -> Response:
        if plan.kind is Fault.TOO_MANY_REQUESTS:
            resp = problem(
                429,
                TYPE_TOO_MANY,
                "Too many requests",
                "Rate limit exceeded (injected by the sandbox); retry with exponential backoff.",
            )
            if plan.retry_after is not None:
                resp.headers["Retry-After"] = (
                    plan.retry_after if isinstance(plan.retry_after, str) else format(plan.retry_after, "g")
                )
            return resp
        if plan.kind is Fault.BAD_REQUEST:
            return problem(
                400,
                TYPE_VALIDATION,
                "Request validation errors",
                "The request could not be processed (injected by the sandbox).",
                validation_errors=[],
            )
        status = plan.status or 500
        return problem(status, TYPE_SERVER, "Internal server error", f"Injected {status} from the sandbox.")

    def _authorized(self, headers: Mapping[str, str]) -> Response | None:
        value = headers.get("Authorization") or ""
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return problem(
                401,
                TYPE_AUTH,
                "Authentication error",
                "Missing or malformed Authorization header; expected 'Bearer <API key>'.",
            )
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return problem(401, TYPE_AUTH, "Authentication error", "The API key provided is invalid.")
        return None

    # ------------------------------------------------------------------ ingest

    def _ingest(self, headers: Mapping[str, str], path: str, query: dict[str, list[str]], raw: bytes) -> IngestResult:
        denied = self._authorized(headers)
        if denied is not None:
            return IngestResult(denied, self._count_events(raw))
        try:
            body = parse_json(raw)
        except BadBody as exc:
            return IngestResult(self._request_invalid(str(exc)), 0)
        n_events = count_events(body)
        if not isinstance(body, dict) or "events" not in body:
            return IngestResult(self._request_invalid('body must be a JSON object {"events": [...]}'), 0)
        extra = sorted(set(body) - {"events"})
        if extra:
            return IngestResult(
                self._request_invalid(f"Unexpected top-level field(s) {extra}: only 'events' is allowed"),
                n_events,
            )
        events = body["events"]
        if not isinstance(events, list):
            return IngestResult(self._request_invalid("'events' must be an array"), 0)
        if len(events) > self.max_events:
            return IngestResult(
                self._request_invalid(
                    f"Too many events in one request: {len(events)} given, the limit is "
                    f"{self.max_events} events per request; split the batch."
                ),
                n_events,
            )

        backfill_id = (query.get("backfill_id") or [None])[0] or None
        conflict = self._conflicting_duplicates(events)
        if conflict is not None:
            return IngestResult(conflict, n_events)

        now = utcnow()
        with self._lock:
            self._tick()
            backfill = None
            if backfill_id is not None:
                backfill = self._backfills.get(backfill_id)
                if backfill is None:
                    return IngestResult(
                        problem(404, TYPE_NOT_FOUND, "Resource not found", f"Backfill {backfill_id} not found."),
                        n_events,
                    )
                if backfill.status != "pending":
                    return IngestResult(
                        problem(
                            400,
                            TYPE_CONSTRAINT,
                            "Constraint violation",
                            f"Backfill {backfill_id} is {backfill.status}; events can only be "
                            "ingested into a pending backfill.",
                        ),
                        n_events,
                    )

            valid: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            # The window an event outside a backfill must fall in; None for backfill ingestion.
            window = None if backfill is not None else (now - self.grace_period, now + FUTURE_TOLERANCE)
            for event in events:
                if window is not None and _plainly_valid(event, *window):
                    valid.append(event)
                    continue
                errors = self._event_errors(event, now, backfill)
                if errors:
                    key = event.get("idempotency_key") if isinstance(event, dict) else None
                    # Orb attributes failures by key only; "" stands for a missing/invalid key.
                    failed.append(
                        {
                            "idempotency_key": key if isinstance(key, str) else "",
                            "validation_errors": errors,
                        }
                    )
                else:
                    valid.append(event)

            if failed and self.validation_response == "400":
                return IngestResult(
                    problem(
                        400,
                        TYPE_VALIDATION,
                        "Request validation errors",
                        f"{len(failed)} of {len(events)} events failed validation; no events in "
                        "this request were ingested. Fix them and re-send with the same "
                        "idempotency keys.",
                        validation_errors=failed,
                    ),
                    n_events,
                )
            if backfill is not None:
                self._hold_in_backfill(backfill, valid)
            else:
                self._accept(valid)
        return IngestResult(Response(200, {"validation_failed": failed}), n_events)

    def _request_invalid(self, detail: str) -> Response:
        return problem(400, TYPE_VALIDATION, "Request validation errors", detail, validation_errors=[])

    def _conflicting_duplicates(self, events: list[Any]) -> Response | None:
        """Whole-batch 400 when one key carries two different bodies (per the spec).

        Bodies are compared as :func:`canonical` texts, computed only for keys that occur more
        than once: a batch of distinct keys costs one set.
        """
        keys = [self._event_key(event) if isinstance(event, dict) else None for event in events]
        named = [key for key in keys if key is not None]
        if len(set(named)) == len(named):
            return None
        repeated = {key for key, count in Counter(named).items() if count > 1}
        first_text: dict[str, str] = {}
        conflicts: list[str] = []
        for event, key in zip(events, keys, strict=True):
            if key not in repeated:
                continue
            text = canonical(event)
            if first_text.setdefault(key, text) != text and key not in conflicts:
                conflicts.append(key)
        if not conflicts:
            return None
        return problem(
            400,
            TYPE_VALIDATION,
            "Request validation errors",
            "The batch contains events with the same idempotency_key but different bodies; "
            "the entire batch was rejected.",
            validation_errors=[
                {
                    "idempotency_key": key,
                    "validation_errors": [
                        f"Duplicate idempotency_key '{key}' with a different event body in the same batch"
                    ],
                }
                for key in conflicts
            ],
        )

    def _event_errors(self, event: Any, now: datetime, backfill: _Backfill | None) -> list[str]:
        """All validation failures of one event (empty when valid)."""
        if not isinstance(event, dict):
            return ["event must be a JSON object"]
        errors: list[str] = []
        for name in sorted(set(event) - EVENT_FIELDS):
            errors.append(f"Unexpected field '{name}': additional properties are not allowed")
        for name in ("event_name", "idempotency_key"):
            if name not in event:
                errors.append(f"Missing required field '{name}'")
            elif not isinstance(event[name], str) or not event[name].strip():
                errors.append(f"{name} must be a non-empty string")

        if "timestamp" not in event:
            errors.append("Missing required field 'timestamp'")
        else:
            try:
                ts = parse_timestamp(event["timestamp"])
            except ValueError as exc:
                errors.append(str(exc))
            else:
                errors.extend(self._timestamp_errors(ts, now, backfill))

        if "properties" not in event:
            errors.append("Missing required field 'properties'")
        else:
            errors.extend(_property_errors(event["properties"]))

        cid, ext = event.get("customer_id"), event.get("external_customer_id")
        for name, value in (("customer_id", cid), ("external_customer_id", ext)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                errors.append(f"{name} must be a non-empty string or null")
        if (cid is None) == (ext is None):
            errors.append("Exactly one of customer_id and external_customer_id must be specified")
        elif backfill is not None and backfill.scope is not None and not backfill.in_scope(event):
            errors.append(
                f"Event customer does not match the backfill's customer scope ({backfill.scope[0]}={backfill.scope[1]})"
            )
        return errors

    def _timestamp_errors(self, ts: datetime, now: datetime, backfill: _Backfill | None) -> list[str]:
        limit = now + FUTURE_TOLERANCE
        if ts > limit:
            return [
                (
                    f"Event timestamp {ts.isoformat()} must be earlier than {limit.isoformat()}; "
                    "timestamps may be at most 5 minutes in the future"
                )
            ]
        if backfill is not None:
            if not backfill.covers(ts):
                return [
                    (
                        f"Event timestamp {ts.isoformat()} is outside the backfill's timeframe "
                        f"[{backfill.timeframe_start.isoformat()}, "
                        f"{backfill.timeframe_end.isoformat()})"
                    )
                ]
            return []
        cutoff = now - self.grace_period
        if ts < cutoff:
            return [
                (
                    f"Event timestamp {ts.isoformat()} must be later than {cutoff.isoformat()} "
                    "based on account grace period. To ingest an event older than the account "
                    "grace period, create a backfill"
                )
            ]
        return []

    def _hold_in_backfill(self, backfill: _Backfill, events: list[dict[str, Any]]) -> None:
        """Keep events on a pending backfill until it is closed (called under the lock)."""
        for event in events:
            key = event["idempotency_key"]
            if key in backfill.keys:
                self._duplicates += 1
                continue
            backfill.keys.add(key)
            backfill.events.append(event)

    # ------------------------------------------------------------------ backfills

    def _route(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query: dict[str, list[str]],
        raw: bytes,
    ) -> Response:
        if not path.startswith("/v1/"):
            return self._not_found(path)
        denied = self._authorized(headers)
        if denied is not None:
            return denied
        if path.rstrip("/") == "/v1/ingest":
            return Response(
                405,
                {
                    "type": TYPE_URL_NOT_FOUND,
                    "status": 405,
                    "title": "Method not allowed",
                    "detail": f"{method} is not allowed on /v1/ingest; use POST.",
                },
                {"Allow": "POST"},
            )
        match = _CUSTOMER_PATH.match(path)
        if match and method == "GET":
            return self._customer(urllib.parse.unquote(match.group(1)))
        if path.rstrip("/") == "/v1/events/volume" and method == "GET":
            return self._event_volume(query)
        if path.rstrip("/") == "/v1/events/search" and method == "POST":
            return self._search_events(raw)
        if path.rstrip("/") == "/v1/events/backfills":
            if method == "POST":
                return self._create_backfill(raw)
            if method == "GET":
                return self._list_backfills(query)
        match = _BACKFILL_PATH.match(path)
        if match:
            backfill_id, action = match.groups()
            if action is None and method == "GET":
                return self._with_backfill(backfill_id, lambda bf, now: bf)
            if action == "close" and method == "POST":
                return self._with_backfill(backfill_id, self._close_action)
            if action == "revert" and method == "POST":
                return self._with_backfill(backfill_id, self._revert_action)
        return self._not_found(path)

    def _customer(self, external_id: str) -> Response:
        """``GET /v1/customers/external_customer_id/{id}``: the Customer, or Orb's 404 problem."""
        with self._lock:
            known = self._customers is None or external_id in self._customers
        if not known:
            return problem(404, TYPE_NOT_FOUND, "Resource not found",
                           f"Customer with external_customer_id {external_id} not found")
        orb_id = "cus_orb_" + hashlib.blake2b(external_id.encode(), digest_size=8).hexdigest()
        return Response(200, {"id": orb_id, "external_customer_id": external_id,
                              "name": external_id, "email": f"{external_id}@example.com", "currency": "USD",
                              "timezone": "UTC", "metadata": {}})

    # ------------------------------------------------------------------ reading events back

    def _event_volume(self, query: dict[str, list[str]]) -> Response:
        """``GET /v1/events/volume``: hourly counts by event timestamp, paginated (see the module docstring)."""
        try:
            limit = int((query.get("limit") or ["20"])[0])
            offset = int((query.get("cursor") or ["0"])[0] or 0)
            if not 1 <= limit <= 100 or offset < 0:
                raise ValueError
        except ValueError:
            return self._request_invalid("limit must be an integer in [1, 100] and cursor a value from next_cursor")
        start_text = (query.get("timeframe_start") or [""])[0]
        end_text = (query.get("timeframe_end") or [""])[0]
        if not start_text:
            return self._request_invalid("Missing required query parameter 'timeframe_start'")
        try:
            start = parse_timestamp(start_text, require_utc=False)
            end = parse_timestamp(end_text, require_utc=False) if end_text else utcnow()
        except ValueError as exc:
            return self._request_invalid(f"timeframe: {exc}")
        first = _hour_of(start)
        # An end inside an hour includes that hour; an hour-aligned end is exclusive.
        last = _hour_of(end) + (HOUR if end != _hour_of(end) else timedelta(0))
        if last <= first:
            return self._request_invalid("timeframe_end must be after timeframe_start")
        hours = int((last - first) / HOUR)
        counts: Counter[datetime] = Counter()
        with self._lock:
            for event in self._keys.values():
                stamp = _hour_of(parse_timestamp(event["timestamp"]))
                if first <= stamp < last:
                    counts[stamp] += 1
        page = [first + HOUR * n for n in range(offset, min(offset + limit, hours))]
        has_more = offset + limit < hours
        return Response(200, {
            "data": [{"timeframe_start": format_time(hour), "timeframe_end": format_time(hour + HOUR),
                      "count": counts[hour]} for hour in page],
            "pagination_metadata": {"has_more": has_more, "next_cursor": str(offset + limit) if has_more else None},
        })

    def _search_events(self, raw: bytes) -> Response:
        """``POST /v1/events/search``: the held events among ``event_ids`` inside the timeframe."""
        try:
            body = parse_json(raw)
        except BadBody as exc:
            return self._request_invalid(str(exc))
        if not isinstance(body, dict):
            return self._request_invalid("body must be a JSON object (EventSearchCriteria)")
        errors = [f"Unexpected field '{name}': additional properties are not allowed"
                  for name in sorted(set(body) - SEARCH_FIELDS)]
        ids = body.get("event_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            errors.append("event_ids must be an array of strings")
        elif not 1 <= len(ids) <= MAX_SEARCH_IDS:
            errors.append(f"event_ids must hold between 1 and {MAX_SEARCH_IDS} ids, not {len(ids)}")
        now = utcnow()
        bounds = {"timeframe_start": now - DEFAULT_SEARCH_WINDOW, "timeframe_end": now}
        for name in bounds:
            if body.get(name) is not None:
                try:
                    bounds[name] = parse_timestamp(body[name], require_utc=False)
                except ValueError as exc:
                    errors.append(f"{name}: {exc}")
        if errors:
            return problem(400, TYPE_VALIDATION, "Request validation errors", "; ".join(errors),
                           validation_errors=errors)
        start, end = bounds["timeframe_start"], bounds["timeframe_end"]
        if end <= start:
            return problem(400, TYPE_CONSTRAINT, "Constraint violation", "timeframe_end must be after timeframe_start.")
        with self._lock:
            self._tick()
            held = [self._keys[key] for key in dict.fromkeys(ids) if key in self._keys]
        found = []
        for event in held:
            stamp = parse_timestamp(event["timestamp"])
            if start <= stamp < end:
                found.append({"id": event["idempotency_key"], "customer_id": event.get("customer_id"),
                              "external_customer_id": event.get("external_customer_id"),
                              "event_name": event["event_name"], "properties": event["properties"],
                              "timestamp": format_time(stamp), "deprecated": False})
        return Response(200, {"data": found})

    def _create_backfill(self, raw: bytes) -> Response:
        """Create a backfill (``NewBackfill``).

        Rejections, all 400: schema errors (``#400-request-validation-errors``); a timeframe that
        is empty or longer than 31 days, or that overlaps a ``pending``/``pending_revert``
        backfill of the same customer scope or an account-wide one (``#400-constraint-violation``).
        An overlap is answered with 400 rather than 409 because Orb's 409 type
        (``IdempotencyRequestMismatch``) is one that clients, including Orb's SDK, retry
        automatically, and retrying an overlap can never succeed.
        """
        try:
            body = parse_json(raw)
        except BadBody as exc:
            return self._request_invalid(str(exc))
        if not isinstance(body, dict):
            return self._request_invalid("body must be a JSON object (NewBackfill)")
        errors: list[str] = []
        for name in sorted(set(body) - NEW_BACKFILL_FIELDS):
            errors.append(f"Unexpected field '{name}': additional properties are not allowed")
        times: dict[str, datetime | None] = {}
        for name in ("timeframe_start", "timeframe_end", "close_time"):
            value = body.get(name)
            if value is None:
                if name != "close_time":
                    errors.append(f"Missing required field '{name}'")
                times[name] = None
                continue
            try:
                times[name] = parse_timestamp(value, require_utc=False)
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
        replace = body.get("replace_existing_events", True)
        if not isinstance(replace, bool):
            errors.append("replace_existing_events must be a boolean")
        for name in ("customer_id", "external_customer_id", "deprecation_filter"):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                errors.append(f"{name} must be a non-empty string or null")
        cid, ext = body.get("customer_id"), body.get("external_customer_id")
        if cid is not None and ext is not None:
            errors.append("Specify at most one of customer_id and external_customer_id")
        if errors:
            return problem(
                400,
                TYPE_VALIDATION,
                "Request validation errors",
                "; ".join(errors),
                validation_errors=errors,
            )
        start, end = times["timeframe_start"], times["timeframe_end"]
        assert start is not None and end is not None
        if end <= start:
            return problem(400, TYPE_CONSTRAINT, "Constraint violation", "timeframe_end must be after timeframe_start.")
        if end - start > MAX_BACKFILL_DURATION:
            return problem(
                400,
                TYPE_CONSTRAINT,
                "Constraint violation",
                f"Backfill timeframe is {end - start}; backfills may span at most 31 days.",
            )
        scope = ("customer_id", cid) if cid is not None else ("external_customer_id", ext) if ext is not None else None
        now = utcnow()
        with self._lock:
            self._tick()
            for other in self._backfills.values():
                if other.status not in ("pending", "pending_revert"):
                    continue
                if not (start < other.timeframe_end and other.timeframe_start < end):
                    continue
                if scope is None or other.scope is None or scope == other.scope:
                    return problem(
                        400,
                        TYPE_CONSTRAINT,
                        "Constraint violation",
                        f"Backfill timeframe overlaps {other.status} backfill {other.id} "
                        f"({format_time(other.timeframe_start)} to {format_time(other.timeframe_end)}, "
                        f"{'account-wide' if other.scope is None else '='.join(other.scope)}); "
                        "close or revert it first.",
                    )
            backfill_id = f"bf_{self._rng.getrandbits(64):016x}"
            backfill = _Backfill(
                id=backfill_id,
                created_at=now,
                timeframe_start=start,
                timeframe_end=end,
                close_time=times["close_time"] or now + DEFAULT_BACKFILL_CLOSE_AFTER,
                replace_existing_events=bool(replace),
                scope=scope,
                deprecation_filter=body.get("deprecation_filter"),
            )
            self._backfills[backfill_id] = backfill
            return Response(200, backfill.to_json())

    def _list_backfills(self, query: dict[str, list[str]]) -> Response:
        try:
            limit = int((query.get("limit") or ["20"])[0])
            offset = int((query.get("cursor") or ["0"])[0] or 0)
            if not 1 <= limit <= 100 or offset < 0:
                raise ValueError
        except ValueError:
            return self._request_invalid("limit must be an integer in [1, 100] and cursor a value from next_cursor")
        with self._lock:
            newest_first = [bf.to_json() for bf in reversed(self._backfills.values())]
        page = newest_first[offset : offset + limit]
        has_more = offset + limit < len(newest_first)
        return Response(
            200,
            {
                "data": page,
                "pagination_metadata": {
                    "has_more": has_more,
                    "next_cursor": str(offset + limit) if has_more else None,
                },
            },
        )

    def _with_backfill(self, backfill_id: str, action: Any) -> Response:
        with self._lock:
            backfill = self._backfills.get(backfill_id)
            if backfill is None:
                return problem(404, TYPE_NOT_FOUND, "Resource not found", f"Backfill {backfill_id} not found.")
            result = action(backfill, utcnow())
            if isinstance(result, Response):
                return result
            return Response(200, backfill.to_json())

    def _close_action(self, backfill: _Backfill, now: datetime) -> Response | _Backfill:
        if backfill.status == "pending":
            self._close(backfill, now)
        elif backfill.status == "reverted":
            return problem(
                400,
                TYPE_CONSTRAINT,
                "Constraint violation",
                f"Backfill {backfill.id} was reverted and cannot be closed.",
            )
        # Closing a reflected backfill again is a no-op, so a retried close succeeds.
        return backfill

    def _revert_action(self, backfill: _Backfill, now: datetime) -> _Backfill:
        if backfill.status == "pending":
            backfill.events, backfill.keys = [], set()
        elif backfill.status in ("reflected", "pending_revert"):
            self._remove_keys(backfill.added_keys)
            restore = [e for e in backfill.replaced if e["idempotency_key"] not in self._keys]
            self._accept(restore)
        else:
            return backfill  # already reverted: idempotent
        backfill.status = "reverted"
        backfill.reverted_at = now
        return backfill

    def _close(self, backfill: _Backfill, now: datetime) -> None:
        """Reflect a pending backfill into the accepted events (called under the lock)."""
        if backfill.replace_existing_events:
            victims = []
            for key, event in self._keys.items():
                try:
                    ts = parse_timestamp(event.get("timestamp"))
                except ValueError:  # pragma: no cover - accepted events were validated
                    continue
                if backfill.covers(ts) and backfill.in_scope(event):
                    victims.append(key)
            backfill.replaced = self._remove_keys(victims)
        before = set(self._keys)
        self._accept(backfill.events)
        backfill.added_keys = [k for k in self._keys if k not in before]
        backfill.status = "reflected"
        backfill.close_time = now
