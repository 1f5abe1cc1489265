"""Shared machinery for the Orb and Kable sandbox servers.

A sandbox is a real HTTP server on 127.0.0.1 (``ThreadingHTTPServer``, one thread per
connection, HTTP/1.1 keep-alive) that imitates one billing API's event-ingestion endpoint.
This module holds everything that is not vendor specific:

* start/stop and the context-manager protocol;
* the store of accepted events, de-duplicated on the vendor's idempotency key, optionally
  persisted to a JSON-lines ``state_file`` so a restart keeps dedup state;
* a FIFO queue of injected faults plus seedable random faults, applied to the ingest
  endpoint(s) only;
* a per-request log (:class:`RequestRecord`);
* the unauthenticated ``/_sandbox/...`` control endpoints used when the sandbox runs as a
  separate process (see :mod:`usage_billing.sandbox.__main__`).

Vendor subclasses (:mod:`.orb`, :mod:`.kable`) implement request validation and the
vendor's response bodies through a handful of hooks.
"""

from __future__ import annotations

import copy
import enum
import gzip
import json
import logging
import random
import socket
import struct
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import parse_qs, urlsplit

import msgspec

log = logging.getLogger(__name__)

#: Only ever bind loopback: the sandboxes have no real security and control endpoints are open.
HOST = "127.0.0.1"

#: Request bodies above this are refused with 413 without being buffered.
MAX_BODY_BYTES = 64 * 1024 * 1024

#: Default ``delay`` for :attr:`Fault.SLOW` when none is given.
DEFAULT_SLOW_DELAY = 5.0

_REMOVED_MARKER = "_sandbox_removed"

#: Encodes ``state_file`` lines, like ``json.dumps(item, separators=(",", ":"))`` minus building
#: an encoder per line.
_STATE_ENCODER = json.JSONEncoder(separators=(",", ":"))


class Fault(enum.StrEnum):
    """Kinds of fault that can be injected into a sandbox's ingest endpoint."""

    #: Answer 429 (with ``Retry-After`` when ``retry_after`` is given). Nothing is accepted.
    TOO_MANY_REQUESTS = "too_many_requests"
    #: Answer 500, 502 or 503 (``status``, default 500). Nothing is accepted.
    SERVER_ERROR = "server_error"
    #: Sleep ``delay`` seconds, then process and answer normally (client-timeout tests).
    SLOW = "slow"
    #: Reset the connection (TCP RST) without processing the request. Nothing is accepted.
    RESET = "reset"
    #: Process and accept the request, then reset the connection instead of answering.
    LOST_RESPONSE = "lost_response"
    #: Whole-request 400 without per-event attribution. Nothing is accepted.
    BAD_REQUEST = "bad_request"


#: Faults a soak test can survive by retrying; the default for :meth:`SandboxServer.set_random_faults`.
TRANSIENT_FAULTS: tuple[Fault, ...] = (
    Fault.TOO_MANY_REQUESTS,
    Fault.SERVER_ERROR,
    Fault.RESET,
    Fault.LOST_RESPONSE,
)

_SERVER_ERROR_STATUSES = (500, 502, 503)


@dataclass(frozen=True)
class FaultPlan:
    """One concrete fault to apply to one ingest request."""

    kind: Fault
    status: int | None = None
    retry_after: float | str | None = None
    delay: float | None = None


@dataclass(frozen=True)
class RequestRecord:
    """What the sandbox saw and did for one API request (control endpoints are not logged).

    ``status`` is ``None`` when the connection was reset instead of answered
    (:attr:`Fault.RESET`, :attr:`Fault.LOST_RESPONSE`). ``n_events`` is the number of events
    in the body, 0 when the body is not a parseable event list. ``fault`` is the
    injected fault's kind (a :class:`Fault` value string) or ``None``. ``request_id`` is the
    ``X-REQUEST-ID`` Kable sends back (``None`` for Orb).
    """

    method: str
    path: str
    status: int | None
    n_events: int
    fault: str | None
    received_at: datetime
    request_id: str | None = None
    query: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``received_at`` as ISO 8601)."""
        out = asdict(self)
        out["received_at"] = self.received_at.isoformat()
        return out


@dataclass
class Response:
    """An HTTP response a hook wants sent."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class IngestResult:
    """Outcome of a vendor's ingest handler: the response and how many events the body held."""

    response: Response
    n_events: int = 0


class BadBody(Exception):
    """The request body could not be read as JSON (message is safe to show to the client)."""


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def wait_unless_stopped(seconds: float, stopping: threading.Event) -> bool:
    """Wait ``seconds``; ``False`` as soon as ``stopping`` is set (the sandbox is shutting down)."""
    return not stopping.wait(seconds)


@dataclass(frozen=True)
class ServerOptions:
    """How a sandbox serves, whichever API it imitates.

    ``pause`` is how a request handler waits out ``latency`` and :attr:`Fault.SLOW` delays; tests
    pass one that records the delays instead of sleeping them, so no test measures the clock.
    """

    # Seconds added to every ingest response (waited in the handler's own thread).
    latency: float = 0.0
    # Seed of the sandbox's random generator (random faults without their own seed, generated ids).
    seed: int | None = 0
    # JSON-lines file of accepted events, reloaded by start(): dedup and accepted() survive a restart.
    state_file: str | Path | None = None
    # TCP port on 127.0.0.1; 0 picks a free one.
    port: int = 0
    # (seconds, the sandbox's stopping event) -> False when the sandbox stopped during the wait.
    pause: Callable[[float, threading.Event], bool] = wait_unless_stopped

    def __post_init__(self) -> None:
        if self.latency < 0:
            raise ValueError("latency must be >= 0")


def _reject_constant(name: str) -> Any:
    # JSON has no NaN/Infinity; Python's json module accepts them unless told not to.
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Parse a request body strictly (UTF-8, no NaN/Infinity).

    msgspec decodes the common case about twice as fast as :mod:`json`. Whatever it refuses
    (malformed bodies, but also ``1e400`` or lone surrogate escapes, which :mod:`json` reads) is
    parsed again by :mod:`json`, so results and error messages are exactly :mod:`json`'s.

    Raises:
        BadBody: when the body is empty or not valid JSON.
    """
    if not raw.strip():
        raise BadBody("request body is empty")
    try:
        return msgspec.json.decode(raw)
    except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
        pass
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadBody(f"request body is not valid JSON: {exc}") from None


def count_events(body: Any) -> int:
    """Number of events in a parsed body, for the request log.

    The length of a JSON array, or of the ``"events"`` array of an object; 0 otherwise.
    """
    if isinstance(body, list):
        return len(body)
    if isinstance(body, dict) and isinstance(body.get("events"), list):
        return len(body["events"])
    return 0


def canonical(obj: Any) -> str:
    """Return a canonical JSON text, used to compare event bodies exactly.

    ``True == 1 == 1.0`` in Python, so dict equality would call differently typed bodies
    identical; their JSON texts differ.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Handler(BaseHTTPRequestHandler):
    """Routes every request to the owning sandbox; one instance per connection."""

    protocol_version = "HTTP/1.1"
    # Without this each small response waits ~40 ms for the peer's delayed ACK.
    disable_nagle_algorithm = True
    server_version = "usage-billing-sandbox/1.0"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.sandbox._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.sandbox._track(self.connection, add=False)

    def _dispatch(self) -> None:
        self.server.sandbox._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Parallel client workers open many connections at once; the default backlog (5) is too small.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sandbox: SandboxServer) -> None:
        self.sandbox = sandbox
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response are routine here (timeouts, fault tests).
        log.debug("sandbox connection error from %s", client_address, exc_info=sys.exc_info())


class SandboxServer:
    """Base class of :class:`~usage_billing.sandbox.OrbSandbox` and ``KableSandbox``.

    Subclasses set :attr:`name`, :attr:`ingest_paths` and :attr:`key_field` and implement
    :meth:`_ingest`, :meth:`_fault_response` and optionally :meth:`_route`.

    All shared state is guarded by one lock; handler threads hold it only briefly (never
    while sleeping), so ``latency`` and :attr:`Fault.SLOW` delays overlap across requests.
    """

    name = "sandbox"
    #: Paths (POST) that count as "ingest": latency and faults apply to these only.
    ingest_paths: frozenset[str] = frozenset()
    #: Response header carrying a fresh request id on every response, if the vendor has one.
    request_id_header: str | None = None
    #: Event field holding the idempotency key events are de-duplicated on (string values only).
    key_field: str = ""

    def __init__(self, server: ServerOptions = ServerOptions()) -> None:
        """Configure (but do not start) the sandbox; ``server`` says how it serves."""
        self.latency = float(server.latency)
        self.seed = server.seed
        self.state_file = Path(server.state_file) if server.state_file is not None else None
        self._port = int(server.port)
        self._pause = server.pause
        # The address to listen on; the CLI's --host changes it (0.0.0.0 inside a container).
        self.host = HOST
        self._lock = threading.RLock()
        self._rng = random.Random(self.seed)
        self._accepted: list[dict[str, Any]] = []
        self._keys: dict[str, dict[str, Any]] = {}
        self._duplicates = 0
        self._requests: list[RequestRecord] = []
        self._faults: deque[list[Any]] = deque()  # [FaultPlan, remaining]
        self._random_rate = 0.0
        self._random_kinds: tuple[Fault, ...] = ()
        self._random_rng = random.Random(self.seed)
        self._random_params: dict[str, Any] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._state_fh: IO[str] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (the requested one until :meth:`start`)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:<port>``; only meaningful once started."""
        host = HOST if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._server is not None

    def start(self) -> Self:
        """Bind 127.0.0.1, (re)load ``state_file`` and serve in a background thread.

        Returns ``self``. Starting an already running sandbox is a no-op.
        """
        with self._lock:
            if self._server is not None:
                return self
            self._stopping.clear()
            if self.state_file is not None:
                self._load_state()
            server = _Server((self.host, self._port), self)
            self._server = server
            # A later restart of a port-0 sandbox picks a fresh port, but a fixed port is kept.
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{self.name}-sandbox-{self.port}",
                daemon=True,
            )
            self._thread.start()
        log.info("%s sandbox listening on %s", self.name, self.url)
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and close the state file. Idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is None:
                return
            self._stopping.set()
        self._shutdown_promptly(server)
        server.server_close()
        # Keep-alive connections would otherwise keep being served by a "stopped" sandbox.
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            if self._state_fh is not None:
                self._state_fh.close()
                self._state_fh = None

    @staticmethod
    def _shutdown_promptly(server: _Server) -> None:
        """``server.shutdown()`` without waiting out the serve loop's poll interval.

        The loop only notices the shutdown flag when ``select`` returns; a throwaway connection
        makes it return at once (test suites stop hundreds of sandboxes).
        """
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        address = server.server_address[:2]
        while stopper.is_alive():
            try:
                socket.create_connection(address, timeout=0.2).close()
            except OSError:
                pass
            stopper.join(0.005)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ------------------------------------------------------------------ inspection

    def accepted(self) -> list[dict[str, Any]]:
        """Every accepted event (one per idempotency key), in arrival order, as copies."""
        with self._lock:
            self._tick()
            return copy.deepcopy(self._accepted)

    def accepted_keys(self) -> set[str]:
        """The idempotency keys of the accepted events."""
        with self._lock:
            self._tick()
            return set(self._keys)

    @property
    def duplicates(self) -> int:
        """Events received whose key was already accepted (de-duplicated, not re-recorded)."""
        with self._lock:
            return self._duplicates

    @property
    def requests(self) -> list[RequestRecord]:
        """One :class:`RequestRecord` per API request, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def pending_faults(self) -> int:
        """How many queued fault applications are left (random faults not counted)."""
        with self._lock:
            return sum(remaining for _, remaining in self._faults)

    # ------------------------------------------------------------------ faults

    def inject(
        self,
        kind: Fault | str,
        times: int = 1,
        *,
        status: int | None = None,
        retry_after: float | str | None = None,
        delay: float | None = None,
    ) -> None:
        """Queue a fault for the next ``times`` ingest requests (FIFO with earlier injections).

        Args:
            kind: the :class:`Fault` (or its string value).
            times: how many consecutive ingest requests it applies to.
            status: for :attr:`Fault.SERVER_ERROR`: 500, 502 or 503 (default 500).
            retry_after: for :attr:`Fault.TOO_MANY_REQUESTS`: value of the ``Retry-After``
                header (seconds, or an HTTP-date string); omitted when ``None``.
            delay: for :attr:`Fault.SLOW`: seconds to sleep before answering (default 5).
        """
        plan = self._make_plan(kind, status=status, retry_after=retry_after, delay=delay)
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append([plan, int(times)])

    def set_random_faults(
        self,
        rate: float,
        kinds: Iterable[Fault | str] | None = None,
        seed: int | None = None,
        *,
        retry_after: float | str | None = None,
        delay: float | None = None,
    ) -> None:
        """Fail a random fraction of ingest requests (after any queued faults are used up).

        Draws come from a generator seeded with ``seed`` (the sandbox seed when ``None``),
        so a sequential client sees the same fault sequence for the same seed.

        Args:
            rate: probability in [0, 1] that an ingest request is faulted; 0 turns it off.
            kinds: faults to choose from uniformly (default: the transient ones, i.e. 429,
                5xx, RESET and LOST_RESPONSE). A SERVER_ERROR picks 500/502/503 at random.
            seed: seed for the draws.
            retry_after: ``Retry-After`` for random 429s (none by default).
            delay: sleep for random SLOW faults (default 5 s).
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        chosen = tuple(self._make_plan(k, delay=0).kind for k in (kinds if kinds is not None else TRANSIENT_FAULTS))
        if rate > 0 and not chosen:
            raise ValueError("kinds must not be empty")
        with self._lock:
            self._random_rate = float(rate)
            self._random_kinds = chosen
            self._random_rng = random.Random(self.seed if seed is None else seed)
            self._random_params = {"retry_after": retry_after, "delay": delay}

    def clear_faults(self) -> None:
        """Drop queued faults and turn random faults off."""
        with self._lock:
            self._faults.clear()
            self._random_rate = 0.0

    @staticmethod
    def _make_plan(
        kind: Fault | str,
        *,
        status: int | None = None,
        retry_after: float | str | None = None,
        delay: float | None = None,
    ) -> FaultPlan:
        if isinstance(kind, str) and not isinstance(kind, Fault) and kind.upper() in Fault.__members__:
            kind = Fault[kind.upper()]  # also accept the member name, e.g. "SERVER_ERROR"
        kind = Fault(kind)
        if kind is Fault.SERVER_ERROR:
            status = 500 if status is None else int(status)
            if not 500 <= status <= 599:
                raise ValueError("SERVER_ERROR status must be a 5xx code (500, 502 or 503)")
        elif status is not None:
            raise ValueError(f"status applies to {Fault.SERVER_ERROR.value} only")
        if kind is Fault.SLOW:
            delay = DEFAULT_SLOW_DELAY if delay is None else float(delay)
            if delay < 0:
                raise ValueError("delay must be >= 0")
        if retry_after is not None and not isinstance(retry_after, str) and retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        return FaultPlan(kind=kind, status=status, retry_after=retry_after, delay=delay)

    def _take_fault(self) -> FaultPlan | None:
        with self._lock:
            if self._faults:
                entry = self._faults[0]
                entry[1] -= 1
                if entry[1] <= 0:
                    self._faults.popleft()
                return entry[0]
            if self._random_rate <= 0:
                return None
            rng = self._random_rng
            if rng.random() >= self._random_rate:
                return None
            kind = self._random_kinds[rng.randrange(len(self._random_kinds))]
            status = rng.choice(_SERVER_ERROR_STATUSES) if kind is Fault.SERVER_ERROR else None
            return self._make_plan(kind, status=status, **self._random_params)

    def delete_events(self, keys: Iterable[str]) -> int:
        """Remove accepted events by key, as if the vendor had lost them; returns how many were held.

        A test helper (also ``POST /_sandbox/delete_events``): reconciliation must find the loss and
        re-send the event, which the sandbox then accepts again under the same key.
        """
        with self._lock:
            return len(self._remove_keys(keys))

    # ------------------------------------------------------------------ reset / state

    def reset(self) -> None:
        """Forget accepted events, duplicates, the request log and faults.

        With a ``state_file`` the file is truncated too, so the reset survives a restart.
        """
        with self._lock:
            self._accepted = []
            self._keys = {}
            self._duplicates = 0
            self._requests = []
            self._faults.clear()
            self._random_rate = 0.0
            self._reset_vendor_state()
            if self.state_file is not None:
                if self._state_fh is not None:
                    self._state_fh.close()
                    self._state_fh = None
                self.state_file.parent.mkdir(parents=True, exist_ok=True)
                self.state_file.write_text("", encoding="utf-8")

    def _reset_vendor_state(self) -> None:
        """Hook: forget vendor-specific state (called under the lock)."""

    def _load_state(self) -> None:
        """Rebuild the accepted store from ``state_file`` (called under the lock)."""
        assert self.state_file is not None
        self._accepted = []
        self._keys = {}
        if self._state_fh is not None:
            self._state_fh.close()
            self._state_fh = None
        if not self.state_file.exists():
            return
        # Positions let a removal marker (backfill replacement) drop an earlier line in O(1).
        entries: list[dict[str, Any] | None] = []
        position: dict[str, int] = {}
        with self.state_file.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    # A process killed mid-write leaves a torn last line; the batch it belonged
                    # to was never acknowledged, so dropping it matches what the client saw.
                    log.warning("%s: skipping unreadable line %d", self.state_file, lineno)
                    continue
                if not isinstance(item, dict):
                    continue
                if set(item) == {_REMOVED_MARKER}:
                    pos = position.pop(str(item[_REMOVED_MARKER]), None)
                    if pos is not None:
                        entries[pos] = None
                    continue
                key = self._event_key(item)
                if key is not None:
                    if key in position:
                        continue
                    position[key] = len(entries)
                entries.append(item)
        self._accepted = [e for e in entries if e is not None]
        self._keys = {k: e for k, pos in position.items() if (e := entries[pos]) is not None}
        self._on_state_loaded()

    def _on_state_loaded(self) -> None:
        """Hook: rebuild vendor indexes after :meth:`_load_state` (called under the lock)."""

    def _state_write(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Append JSON lines to ``state_file`` and flush (called under the lock)."""
        if self.state_file is None:
            return
        if self._state_fh is None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self._state_fh = self.state_file.open("a", encoding="utf-8")
        self._state_fh.write("".join(_STATE_ENCODER.encode(item) + "\n" for item in items))
        self._state_fh.flush()

    # ------------------------------------------------------------------ accepting events

    def _accept(self, events: Iterable[dict[str, Any]]) -> tuple[int, int]:
        """Record events, de-duplicating on their key. Returns (accepted, duplicates).

        Called under the lock; persists the newly accepted events.
        """
        new: list[dict[str, Any]] = []
        dups = 0
        keys, key_field = self._keys, self.key_field
        for event in events:
            key = event.get(key_field)  # inlined _event_key: this loop runs for every event
            if isinstance(key, str):
                if key in keys:
                    dups += 1
                    continue
                keys[key] = event
            new.append(event)
        self._accepted.extend(new)
        self._duplicates += dups
        self._state_write(new)
        return len(new), dups

    def _remove_keys(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        """Remove accepted events by key, returning them (called under the lock)."""
        ordered = [k for k in dict.fromkeys(keys) if k in self._keys]
        if not ordered:
            return []
        gone = set(ordered)
        removed = [self._keys.pop(k) for k in ordered]
        self._accepted = [e for e in self._accepted if (k := self._event_key(e)) is None or k not in gone]
        self._state_write({_REMOVED_MARKER: k} for k in ordered)
        return removed

    # ------------------------------------------------------------------ hooks

    def _event_key(self, event: Mapping[str, Any]) -> str | None:
        """Return the event's idempotency key (its string :attr:`key_field`), or ``None``."""
        key = event.get(self.key_field)
        return key if isinstance(key, str) else None

    def _ingest(self, headers: Mapping[str, str], path: str, query: dict[str, list[str]], raw: bytes) -> IngestResult:
        """Authenticate, validate and accept one ingest request."""
        raise NotImplementedError

    def _fault_response(self, plan: FaultPlan) -> Response:
        """Return the vendor's response for a 429 / 5xx / BAD_REQUEST fault."""
        raise NotImplementedError

    def _route(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query: dict[str, list[str]],
        raw: bytes,
    ) -> Response:
        """Answer a non-ingest API request (default: 404)."""
        return self._not_found(path)

    def _not_found(self, path: str) -> Response:
        return Response(404, {"message": "Not Found"})

    @staticmethod
    def _count_events(raw: bytes) -> int:
        """:func:`count_events` of a body nobody parsed (faults, refused auth); lenient, 0 if unreadable."""
        try:
            return count_events(json.loads(raw))
        except ValueError:
            return 0

    def _tick(self) -> None:
        """Hook: time-driven state changes (e.g. backfill auto-close); called under the lock."""

    def _control_extra(self) -> dict[str, Any]:
        """Hook: extra fields for ``GET /_sandbox/events``."""
        return {}

    # ------------------------------------------------------------------ request handling

    def _sleep(self, seconds: float) -> bool:
        """Sleep without holding the lock; ``False`` if the sandbox is stopping meanwhile."""
        if seconds <= 0:
            return not self._stopping.is_set()
        return self._pause(seconds, self._stopping)

    def _log_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _handle(self, h: _Handler) -> None:
        received_at = utcnow()
        parts = urlsplit(h.path)
        path, query_text = parts.path, parts.query
        query = parse_qs(query_text, keep_blank_values=True)
        method = h.command
        request_id = self._new_request_id()

        def record(status: int | None, n_events: int = 0, fault: FaultPlan | None = None) -> None:
            self._log_request(
                RequestRecord(
                    method=method,
                    path=path,
                    status=status,
                    n_events=n_events,
                    fault=fault.kind.value if fault else None,
                    received_at=received_at,
                    request_id=request_id,
                    query=query_text,
                )
            )

        if path.startswith("/_sandbox/"):
            raw = self._read_body(h)
            if raw is None:
                return
            self._send(h, self._control(method, path, raw), request_id)
            return

        with self._lock:
            self._tick()

        if not (method == "POST" and path in self.ingest_paths):
            raw = self._read_body(h)
            if raw is None:
                return
            try:
                resp = self._route(method, path, h.headers, query, raw)
            except Exception:
                log.exception("%s sandbox: error handling %s %s", self.name, method, path)
                resp = self._fault_response(FaultPlan(Fault.SERVER_ERROR, status=500))
            record(resp.status)
            self._send(h, resp, request_id)
            return

        fault = self._take_fault()
        if not self._sleep(self.latency):
            self._reset_connection(h)
            return
        if fault is not None and fault.kind is Fault.RESET:
            # Drain (never parse) the body first: a reset that races the client's body upload
            # is reported by some clients as a clean EOF instead, which makes tests flaky.
            raw = self._read_body(h)
            record(None, 0 if raw is None else self._count_events(raw), fault)
            self._reset_connection(h)
            return
        if fault is not None and fault.kind is Fault.SLOW and not self._sleep(fault.delay or 0.0):
            self._reset_connection(h)
            return
        raw = self._read_body(h)
        if raw is None:
            return
        if fault is not None and fault.kind in (
            Fault.TOO_MANY_REQUESTS,
            Fault.SERVER_ERROR,
            Fault.BAD_REQUEST,
        ):
            resp = self._fault_response(fault)
            record(resp.status, self._count_events(raw), fault)
            self._send(h, resp, request_id)
            return
        try:
            result = self._ingest(h.headers, path, query, raw)
        except Exception:
            log.exception("%s sandbox: error handling ingest", self.name)
            result = IngestResult(self._fault_response(FaultPlan(Fault.SERVER_ERROR, status=500)))
        if fault is not None and fault.kind is Fault.LOST_RESPONSE:
            record(None, result.n_events, fault)
            self._reset_connection(h)
            return
        record(result.response.status, result.n_events, fault)
        self._send(h, result.response, request_id)

    def _new_request_id(self) -> str | None:
        return None

    # ------------------------------------------------------------------ control endpoints

    def _control(self, method: str, path: str, raw: bytes) -> Response:
        """Serve the unauthenticated ``/_sandbox/*`` endpoints (never faulted, not logged)."""
        route = (method, path.rstrip("/"))
        if route == ("GET", "/_sandbox/health"):
            return Response(200, {"ok": True, "name": self.name})
        if route == ("GET", "/_sandbox/events"):
            with self._lock:
                self._tick()
                body = {
                    "accepted": copy.deepcopy(self._accepted),
                    "duplicates": self._duplicates,
                    "requests": len(self._requests),
                }
                body.update(self._control_extra())
            return Response(200, body)
        if route == ("GET", "/_sandbox/requests"):
            return Response(200, {"requests": [r.to_json() for r in self.requests]})
        if route == ("POST", "/_sandbox/reset"):
            self.reset()
            return Response(200, {"ok": True})
        if route == ("POST", "/_sandbox/delete_events"):
            try:
                spec = parse_json(raw)
                keys = spec.get("keys") if isinstance(spec, dict) else None
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                    raise ValueError('body must be an object {"keys": [...]} of strings')
            except (BadBody, ValueError) as exc:
                return Response(400, {"ok": False, "error": str(exc)})
            return Response(200, {"ok": True, "deleted": self.delete_events(keys)})
        if route == ("DELETE", "/_sandbox/faults"):
            self.clear_faults()
            return Response(200, {"ok": True})
        if route == ("POST", "/_sandbox/faults"):
            try:
                spec = parse_json(raw)
                if not isinstance(spec, dict) or "kind" not in spec:
                    raise ValueError('body must be an object with a "kind"')
                unknown = set(spec) - {"kind", "times", "status", "retry_after", "delay"}
                if unknown:
                    raise ValueError(f"unknown fields: {sorted(unknown)}")
                self.inject(
                    spec["kind"],
                    int(spec.get("times", 1)),
                    status=spec.get("status"),
                    retry_after=spec.get("retry_after"),
                    delay=spec.get("delay"),
                )
            except (BadBody, ValueError, TypeError) as exc:
                return Response(400, {"ok": False, "error": str(exc)})
            return Response(200, {"ok": True, "pending_faults": self.pending_faults})
        if route == ("POST", "/_sandbox/random_faults"):
            try:
                spec = parse_json(raw)
                if not isinstance(spec, dict) or "rate" not in spec:
                    raise ValueError('body must be an object with a "rate"')
                self.set_random_faults(
                    float(spec["rate"]),
                    spec.get("kinds"),
                    spec.get("seed"),
                    retry_after=spec.get("retry_after"),
                    delay=spec.get("delay"),
                )
            except (BadBody, ValueError, TypeError) as exc:
                return Response(400, {"ok": False, "error": str(exc)})
            return Response(200, {"ok": True})
        return Response(404, {"ok": False, "error": f"no control endpoint {method} {path}"})

    # ------------------------------------------------------------------ wire helpers

    def _read_body(self, h: _Handler) -> bytes | None:
        """Read the whole body (Content-Length or chunked; gzip/deflate decoded).

        Returns ``None`` after answering the client itself when the body is unusable.
        Reading it in full matters for keep-alive: leftovers would be parsed as the next request.
        """
        try:
            if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
                raw = self._read_chunked(h)
            else:
                length = int(h.headers.get("Content-Length") or 0)
                if length < 0:
                    raise ValueError("negative Content-Length")
                if length > MAX_BODY_BYTES:
                    h.close_connection = True
                    self._send(h, Response(413, {"message": "Request body too large"}), None)
                    return None
                raw = h.rfile.read(length) if length else b""
                if len(raw) != length:
                    raise ValueError("body shorter than Content-Length")
        except ValueError as exc:
            h.close_connection = True
            self._send(h, Response(400, {"message": f"Malformed request body: {exc}"}), None)
            return None
        except OSError:
            h.close_connection = True
            return None
        encoding = h.headers.get("Content-Encoding", "").lower().strip()
        try:
            if encoding == "gzip":
                raw = gzip.decompress(raw)
            elif encoding == "deflate":
                raw = zlib.decompress(raw)
        except (OSError, zlib.error, EOFError):
            self._send(h, Response(400, {"message": "Body could not be decompressed"}), None)
            return None
        return raw

    @staticmethod
    def _read_chunked(h: _Handler) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = h.rfile.readline(1024)
            size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                # Trailer section ends with an empty line.
                while h.rfile.readline(1024).strip():
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise ValueError("chunked body too large")
            chunks.append(h.rfile.read(size))
            h.rfile.readline(1024)

    def _send(self, h: _Handler, resp: Response, request_id: str | None) -> None:
        payload = b"" if resp.body is None else json.dumps(resp.body).encode("utf-8")
        try:
            h.send_response(resp.status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            if self.request_id_header and request_id:
                h.send_header(self.request_id_header, request_id)
            for name, value in resp.headers.items():
                h.send_header(name, value)
            if h.close_connection:
                h.send_header("Connection", "close")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            h.wfile.flush()
        except OSError:
            # The client gave up (e.g. its timeout fired during a SLOW fault).
            h.close_connection = True

    @staticmethod
    def _reset_connection(h: _Handler) -> None:
        """Abort the connection with a TCP RST instead of an orderly FIN."""
        h.close_connection = True
        sock = h.connection
        try:
            # Linger on with timeout 0 makes close() discard buffers and send RST.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        # The socket's fd is only released once its makefile() reader is closed too.
        try:
            h.rfile.close()
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass
