"""Transport shared by the billing API hooks, built on the Airflow HTTP provider's ``HttpHook``.

The hook owns transport; the delivery core (``usage_billing.delivery``) owns what to send.
Per task the hook opens keep-alive sessions from the connection once (one per sending thread, all
sharing one connection pool) instead of ``HttpHook.run()`` per batch, which looks the connection up
and reconnects every time. Every request is paced (requests per second and events per minute, shared
across threads, and across workers when ``rate_limit_storage`` points at Redis) and retried with
tenacity: capped exponential backoff with jitter on 429, 408, 409, 5xx, timeouts and dropped
connections, honouring ``Retry-After``, for at most ``max_attempts`` tries and ``retry_budget`` of
time, which spans several rate-limit windows.

Secrets come from the Airflow connection (masked by Airflow in task logs) and never appear in a
log line or an exception message raised here.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
import requests
import tenacity
from airflow.providers.http.hooks.http import HttpHook
from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from requests_toolbelt.adapters.socket_options import TCPKeepAliveAdapter

from usage_billing.delivery.contract import BatchOutcome, BatchRejected, FatalDeliveryError, TransientDeliveryError

if TYPE_CHECKING:
    from usage_billing.settings_base import DeliverySettings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404, 405})


class RetryableResponse(Exception):
    """A response worth retrying (rate limit, server error)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def describe(error: BaseException) -> str:
    """A short, secret-free description of a transport failure."""
    if isinstance(error, RetryableResponse):
        return str(error)
    if isinstance(error, requests.Timeout):
        return "timed out waiting for the response"
    if isinstance(error, requests.ConnectionError):
        return "connection failed or was reset before a response arrived"
    return type(error).__name__


class Pacer:
    """Blocks until a request of ``cost`` events fits both rate limits (``limits`` moving windows).

    A moving window keeps one entry per unit of its limit in the last period, and each request
    shifts the list, so the events limit is counted in units of ``unit`` events, sized to keep at
    most ``MAX_ENTRIES`` entries: exact for limits up to that many events per minute (Orb's default
    is 10,000), and at worst ``unit - 1`` events over-counted per request above it.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, key: str, settings: DeliverySettings, storage_uri: str = "memory://",
                 sleep: Callable[[float], None] = time.sleep):
        self.key = key
        self.sleep = sleep
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self.requests = RateLimitItemPerSecond(max(1, int(settings.requests_per_second)))
        self.unit = max(1, math.ceil(settings.events_per_minute / self.MAX_ENTRIES))
        self.events = RateLimitItemPerMinute(max(1, int(settings.events_per_minute // self.unit)))
        self.waited = 0.0

    def acquire(self, cost: int) -> None:
        units = math.ceil(cost / self.unit)
        for item, weight in ((self.requests, 1), (self.events, min(units, self.events.amount))):
            while not self.limiter.hit(item, self.key, cost=weight):
                reset = self.limiter.get_window_stats(item, self.key).reset_time
                pause = min(max(reset - time.time(), 0.005), 5.0)
                self.waited += pause
                self.sleep(pause)


def _settle_environment(session: requests.Session, url: str) -> None:
    """Read the proxy and CA-bundle environment variables once, for the session's lifetime.

    With ``trust_env`` requests re-reads the whole environment (and stats ``~/.netrc``) on every
    request, which costs more than encoding a 500-event batch. The settings it would find for the
    API's URL are stored on the session instead; ``~/.netrc`` is never consulted (credentials
    travel only in our headers).
    """
    found = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies.update(found["proxies"])
    session.verify = found["verify"]
    if found["cert"] is not None:
        session.cert = found["cert"]
    session.trust_env = False


class BillingApiHook(HttpHook):
    """Base for the Orb and Kable hooks: sessions, pacing, retries. Subclasses define the API."""

    endpoint: str = ""
    destination: str = ""

    def __init__(self, http_conn_id: str, settings: DeliverySettings, *,
                 rate_limit_storage: str = "memory://", sleep: Callable[[float], None] = time.sleep):
        adapter = TCPKeepAliveAdapter(idle=120, count=20, interval=30,
                                      pool_connections=1, pool_maxsize=max(10, settings.concurrency))
        super().__init__(method="POST", http_conn_id=http_conn_id, adapter=adapter)
        self.settings = settings
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self.pacer = Pacer(f"{self.destination}:{http_conn_id}", settings, rate_limit_storage)

    # -- subclass API ----------------------------------------------------------------------------

    def auth_headers(self, login: str | None, password: str | None) -> dict[str, str]:
        raise NotImplementedError

    def payload(self, events: list[dict]) -> object:
        return events

    def query(self, backfill_id: str | None = None) -> dict[str, str]:
        return {}

    def accepted(self, response: requests.Response, events: list[dict], keys: list[str]) -> BatchOutcome:
        """Read a 2xx response."""
        return BatchOutcome(accepted=list(keys))

    def refused(self, response: requests.Response, events: list[dict], keys: list[str],
                backfill_id: str | None = None) -> BatchOutcome:
        """Read a non-retryable 4xx: reject named events, or raise BatchRejected to bisect."""
        raise BatchRejected(self.error_message(response), response.status_code)

    def error_message(self, response: requests.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return f"HTTP {response.status_code}: {response.text[:300]}"
        if isinstance(body, dict):
            text = body.get("detail") or body.get("message") or body.get("title") or str(body)[:300]
            return f"HTTP {response.status_code}: {text}"
        return f"HTTP {response.status_code}: {str(body)[:300]}"

    # -- transport -------------------------------------------------------------------------------

    def session(self) -> requests.Session:
        """This thread's keep-alive session, opened from the connection on first use."""
        session = getattr(self._local, "session", None)
        if session is None:
            with self._lock:  # HttpHook.get_conn sets attributes on the hook
                connection = self.get_connection(self.http_conn_id)
                session = self.get_conn(headers={
                    "Accept": "application/json", "Content-Type": "application/json",
                    **self.auth_headers(connection.login, connection.password),
                })
                # Credentials travel only in our headers, never as HTTP basic auth.
                session.auth = None
                _settle_environment(session, self.url_from_endpoint(self.endpoint))
                self._sessions.append(session)
            self._local.session = session
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        self._local = threading.local()

    def __enter__(self) -> BillingApiHook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = tenacity.wait_exponential_jitter(
            initial=self.settings.backoff_initial, max=self.settings.backoff_max,
            jitter=self.settings.backoff_initial)(state)
        error = state.outcome.exception() if state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        return max(backoff, retry_after) if retry_after is not None else backoff

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait_for = state.next_action.sleep if state.next_action else 0
        self.log.warning("%s: %s; retry %d/%d in %.1f s", self.destination, describe(error),
                         state.attempt_number, self.settings.max_attempts - 1, wait_for)

    def post(self, events: list[dict], backfill_id: str | None = None) -> requests.Response:
        """One POST of one batch, paced; returns the response or raises RetryableResponse.

        The body is encoded once per request by msgspec (several times faster than the standard
        library's encoder, and it releases no less: every payload is plain JSON types)."""
        body = msgspec.json.encode(self.payload(events))
        self.pacer.acquire(len(events))
        return self.request("POST", self.endpoint, data=body, params=self.query(backfill_id) or None)

    def request(self, method: str, endpoint: str, **kwargs: object) -> requests.Response:
        """One request on this thread's session; raises RetryableResponse on a retryable status."""
        response = self.session().request(method, self.url_from_endpoint(endpoint), timeout=self.settings.timeout,
                                          **kwargs)
        if response.status_code in RETRYABLE_STATUS:
            raise RetryableResponse(response.status_code, self.error_message(response).split(": ", 1)[-1],
                                    parse_retry_after(response.headers.get("Retry-After")))
        return response

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((RetryableResponse, requests.ConnectionError, requests.Timeout)),
            wait=self._wait,
            stop=(tenacity.stop_after_attempt(self.settings.max_attempts)
                  | tenacity.stop_after_delay(self.settings.retry_budget.total_seconds())),
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def call_json(self, method: str, endpoint: str, **kwargs: object) -> tuple[int, object]:
        """A JSON API call (not an event batch) with the same retries; 401/403/404 are fatal."""
        retrying = self._retrying()
        try:
            response = retrying(self.request, method, endpoint, **kwargs)
        except (RetryableResponse, requests.ConnectionError, requests.Timeout) as error:
            raise TransientDeliveryError(f"{self.destination}: {method} {endpoint}: {describe(error)}") from None
        if response.status_code in FATAL_STATUS:
            raise FatalDeliveryError(f"{self.destination}: {method} {endpoint}: {self.error_message(response)}")
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:300]}
        return response.status_code, body

    def send(self, events: list[dict], keys: list[str], backfill_id: str | None = None) -> BatchOutcome:
        """Send one batch with retries; see ``usage_billing.delivery.Sender``."""
        retrying = self._retrying()
        try:
            response = retrying(self.post, events, backfill_id)
        except (RetryableResponse, requests.ConnectionError, requests.Timeout) as error:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise TransientDeliveryError(
                f"{self.destination}: {describe(error)} (gave up after {attempts} attempts)") from None
        retries = retrying.statistics.get("attempt_number", 1) - 1
        if response.ok:
            outcome = self.accepted(response, events, keys)
        elif response.status_code in FATAL_STATUS:
            raise FatalDeliveryError(f"{self.destination}: {self.error_message(response)} "
                                     f"(check the connection {self.http_conn_id!r}: host and credentials)")
        else:
            try:
                outcome = self.refused(response, events, keys, backfill_id)
            except BatchRejected as refusal:  # the core bisects: it counts what this batch cost first
                refusal.requests, refusal.retries = retries + 1, retries
                raise
        outcome.retries += retries
        outcome.requests = retries + 1
        return outcome
