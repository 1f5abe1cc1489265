"""Realistic Segment Warehouses sample data for PostgreSQL and SQLite.

Segment Warehouses stores ``track`` calls as one table per event in the
source's schema (``<source>.<event slug>``). Each table has the base columns
of ``<source>.tracks`` plus one snake_cased column per property, nested
objects flattened with ``_``. This module creates such tables for three
billing events and fills them with data that has the warts of a real
warehouse:

* events spread over hourly windows, ``received_at`` seconds after
  ``timestamp`` and ``uuid_ts`` (the load time) up to 40 minutes later;
* about 5% of rows loaded late (``uuid_ts`` 1 to 30 hours after
  ``timestamp``), about 1% more than 6 hours late. Half of them were queued
  on the client (``sent_at`` and ``received_at`` late too), half were held
  up by a failed warehouse sync (only ``uuid_ts`` late);
* about 2% of events loaded twice with the same ``id`` and payload and a
  later ``uuid_ts``, as a re-sync does;
* about 3% anonymous events (``user_id`` NULL, ``anonymous_id`` set);
* sparse optional properties and a few customers with most of the volume.

Everything is deterministic for a seed. Data for one hourly window of one
event depends only on ``(seed, event, window start, events_per_hour,
customers)``, so generating a range in one call or hour by hour gives the
same rows, and :func:`generate` can stream large volumes in bounded memory.

Timestamps are timezone-aware UTC ``datetime`` objects. On SQLite,
SQLAlchemy stores them as naive UTC text (``YYYY-MM-DD HH:MM:SS.ffffff``);
the tables returned by :func:`event_table` read them back as aware UTC.
"""

from __future__ import annotations

import math
import random
from bisect import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import itemgetter
from typing import Any, Self

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Engine,
    Float,
    MetaData,
    String,
    Table,
)
from sqlalchemy.schema import CreateSchema
from sqlalchemy.types import TypeDecorator, TypeEngine

from usage_billing.naming import check_identifier, flatten_path, snake_case

__all__ = [
    "BASE_COLUMNS",
    "EVENTS",
    "EventSpec",
    "PropertySpec",
    "Sample",
    "SampleStats",
    "UTCDateTime",
    "create_tables",
    "event_table",
    "generate",
    "generate_rows",
    "load",
    "summarize",
]

# --------------------------------------------------------------------------
# Column types
# --------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always binds and returns aware UTC.

    PostgreSQL gets ``TIMESTAMP WITH TIME ZONE``. SQLite has no time zone
    support, so values are converted to UTC and stored naive; naive values
    read back are taken to be UTC. Naive values bound are taken as UTC too.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Normalise a bound ``datetime`` to UTC (naive on SQLite)."""
        if isinstance(value, datetime):
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        """Return result ``datetime`` values as aware UTC."""
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


# Segment's warehouse types (timestamp, integer, float, boolean, varchar).
# Segment's integer is 64-bit on PostgreSQL, and it truncates strings at 512.
_TYPES: dict[str, Callable[[], TypeEngine[Any]]] = {
    "string": lambda: String(512),
    "integer": BigInteger,
    "float": Float,
    "boolean": Boolean,
    "timestamp": UTCDateTime,
}

# --------------------------------------------------------------------------
# Table layout
# --------------------------------------------------------------------------

# Context fields we send, as Segment paths; their columns come from the same
# flattening rule as nested properties.
_CONTEXT_PATHS = (
    "context.library.name",
    "context.library.version",
    "context.ip",
    "context.traits.accountId",
    "context.groupId",
)

#: Base columns of every event table (the ``tracks`` columns we model), in
#: table order, as ``(column, kind)``; ``kind`` is a Segment warehouse type.
BASE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "string"),  # the messageId; String(100), see _column()
    ("anonymous_id", "string"),
    ("user_id", "string"),
    ("event", "string"),
    ("event_text", "string"),
    ("timestamp", "timestamp"),
    ("original_timestamp", "timestamp"),
    ("sent_at", "timestamp"),
    ("received_at", "timestamp"),
    ("uuid_ts", "timestamp"),
    *((flatten_path(path), "string") for path in _CONTEXT_PATHS),
)


@dataclass(frozen=True)
class PropertySpec:
    """One ``track`` property as sent to Segment and as stored.

    Attributes:
        path: The Segment property name; nested keys in dot notation
            (``"plan.tier"`` for ``properties: {plan: {tier: ...}}``).
        kind: Warehouse type: ``string``, ``integer``, ``float``,
            ``boolean`` or ``timestamp``.
        null_rate: Share of rows on which the property is absent (NULL).
    """

    path: str
    kind: str
    null_rate: float = 0.0

    @property
    def column(self) -> str:
        """The warehouse column Segment creates for this property."""
        return flatten_path(self.path)


@dataclass(frozen=True)
class EventSpec:
    """A Segment ``track`` event and its warehouse table.

    Attributes:
        name: The event name as sent (``event`` in the call), e.g. ``"API Call"``;
            stored in ``event_text``.
        properties: The event's properties, in column order.
    """

    name: str
    properties: tuple[PropertySpec, ...] = field(default_factory=tuple)

    @property
    def slug(self) -> str:
        """Table name and ``event`` column value: the snake-cased name."""
        return snake_case(self.name)

    @property
    def property_columns(self) -> dict[str, str]:
        """Mapping of Segment property path to warehouse column."""
        return {p.path: p.column for p in self.properties}

    @property
    def columns(self) -> tuple[str, ...]:
        """All column names of the event table, in order."""
        return tuple(name for name, _ in BASE_COLUMNS) + tuple(p.column for p in self.properties)


_SPECS = (
    EventSpec(
        "API Call",
        (
            PropertySpec("endpoint", "string"),
            PropertySpec("method", "string"),
            PropertySpec("statusCode", "integer"),
            PropertySpec("latencyMs", "integer", 0.02),
            PropertySpec("bytes", "integer", 0.10),
            PropertySpec("plan.tier", "string", 0.20),
        ),
    ),
    EventSpec(
        "Payment Confirmed",
        (
            PropertySpec("amount", "float"),
            PropertySpec("currency", "string"),
            PropertySpec("confirmationTime", "string", 0.05),
        ),
    ),
    EventSpec(
        "Tokens Used",
        (
            PropertySpec("model", "string"),
            PropertySpec("inputTokens", "integer"),
            PropertySpec("outputTokens", "integer"),
            PropertySpec("plan.tier", "string", 0.20),
        ),
    ),
)

#: The sample events, by slug: ``api_call``, ``payment_confirmed``, ``tokens_used``.
EVENTS: dict[str, EventSpec] = {spec.slug: spec for spec in _SPECS}


def _spec(slug: str) -> EventSpec:
    try:
        return EVENTS[slug]
    except KeyError:
        raise ValueError(f"unknown sample event {slug!r}; known: {sorted(EVENTS)}") from None


def _column(name: str, kind: str) -> Column[Any]:
    # messageId is documented as limited to 100 characters.
    type_ = String(100) if name == "id" else _TYPES[kind]()
    # No primary key and nullable everywhere: the warehouse holds duplicate
    # ids, and Segment only creates columns, never constraints.
    return Column(name, type_, nullable=True)


def event_table(metadata: MetaData, schema: str, slug: str) -> Table:
    """Return the :class:`~sqlalchemy.Table` for one sample event.

    The table is ``<schema>.<slug>`` with :data:`BASE_COLUMNS` followed by
    the event's property columns. If ``metadata`` already holds it, the
    existing object is returned.

    Args:
        metadata: Metadata to attach the table to.
        schema: The Segment source schema (on SQLite, an attached database).
        slug: A key of :data:`EVENTS`.

    Raises:
        ValueError: For an unknown slug or an unsafe schema name.
    """
    spec = _spec(slug)
    check_identifier(schema, "schema")
    existing = metadata.tables.get(f"{schema}.{slug}")
    if existing is not None:
        return existing
    columns = [_column(name, kind) for name, kind in BASE_COLUMNS]
    columns += [_column(p.column, p.kind) for p in spec.properties]
    return Table(slug, metadata, *columns, schema=schema)


def create_tables(engine: Engine, schema: str, events: Iterable[str] = EVENTS) -> None:
    """Create the event tables (and on PostgreSQL the schema) if missing.

    Idempotent. On SQLite the schema must already be attached to every
    connection of ``engine`` (``ATTACH DATABASE ... AS <schema>``).

    Args:
        engine: Target database.
        schema: Source schema name.
        events: Slugs of the events whose tables to create.
    """
    check_identifier(schema, "schema")
    metadata = MetaData()
    tables = [event_table(metadata, schema, slug) for slug in events]
    with engine.begin() as conn:
        if conn.dialect.name != "sqlite":
            conn.execute(CreateSchema(schema, if_not_exists=True))
        metadata.create_all(conn, tables=tables, checkfirst=True)


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------

_HOUR = timedelta(hours=1)
_ANONYMOUS_RATE = 0.03
_DUPLICATE_RATE = 0.02
_LATE_RATE = 0.05  # uuid_ts more than 1 h after timestamp
_VERY_LATE_RATE = 0.01  # ... more than 6 h after: behind a typical lookback
_GROUP_RATE = 0.5  # rows that carry context.groupId
_CLIENT_SKEW_RATE = 0.3  # rows from a client whose clock is off

# Customer names: the first ones get most of the traffic.
_NAMES = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne",
    "wonka", "tyrell", "cyberdyne", "soylent", "vandelay", "piedpiper",
    "aperture", "oscorp", "nakatomi", "virtucon", "bluth", "monarch",
    "gringotts", "dunder", "krusty", "duff", "massive",
)  # fmt: skip

# (library name, version, messageId style, share of identified calls that
# also carry an anonymousId). Browser SDKs always set anonymousId; server
# SDKs only when the caller passes one.
_LIBRARIES = (
    ("analytics-python", "2.3.2", "uuid", 0.1),
    ("analytics-node", "2.1.2", "node", 0.2),
    ("analytics.js", "2.11.1", "ajs", 1.0),
    ("analytics-go", "3.3.0", "uuid", 0.0),
)

# Addresses from the documentation ranges (RFC 5737), never real hosts.
_IP_PREFIXES = ("192.0.2.", "198.51.100.", "203.0.113.")


@dataclass(frozen=True)
class _Customer:
    user_id: str
    account_id: str
    group_id: str
    tier: str
    library_name: str
    library_version: str
    id_style: str
    anonymous_rate: float
    ips: tuple[str, ...]
    anonymous_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Population:
    customers: tuple[_Customer, ...]
    cumulative: tuple[float, ...]
    anonymous_ids: tuple[str, ...]  # visitors who never identified


def _uuid4(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


@lru_cache(maxsize=32)
def _population(seed: int, customers: int) -> _Population:
    rng = random.Random(f"usage_billing.sample_data:{seed}:customers:{customers}")
    people: list[_Customer] = []
    for i in range(customers):
        name = _NAMES[i] if i < len(_NAMES) else f"customer{i + 1}"
        library, version, style, anon_rate = _LIBRARIES[rng.randrange(len(_LIBRARIES))]
        # Big customers are on enterprise plans, the long tail mostly free.
        tier = "enterprise" if i < 2 else ("pro" if i < 6 or rng.random() < 0.3 else "free")
        prefix = _IP_PREFIXES[i % len(_IP_PREFIXES)]
        people.append(
            _Customer(
                user_id=f"cus_{name}",
                account_id=f"acct_{1001 + i}",
                group_id=f"grp_{1001 + i}",
                tier=tier,
                library_name=library,
                library_version=version,
                id_style=style,
                anonymous_rate=anon_rate,
                ips=tuple(f"{prefix}{rng.randrange(1, 255)}" for _ in range(3)),
                anonymous_ids=tuple(_uuid4(rng) for _ in range(4)),
            )
        )
    # Zipf-like volume: with 12 customers the top three send about 60%.
    weights = [1.0 / (rank + 1) ** 1.3 for rank in range(customers)]
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)
    if cumulative:
        cumulative[-1] = 1.0
    return _Population(
        customers=tuple(people),
        cumulative=tuple(cumulative),
        anonymous_ids=tuple(_uuid4(rng) for _ in range(200)),
    )


def _weighted(choices: Sequence[tuple[float, Any]]) -> tuple[tuple[float, ...], tuple[Any, ...]]:
    total = sum(w for w, _ in choices)
    cumulative, acc = [], 0.0
    for w, _ in choices:
        acc += w / total
        cumulative.append(acc)
    cumulative[-1] = 1.0
    return tuple(cumulative), tuple(v for _, v in choices)


# (weight, (endpoint, method, mean response bytes))
_ENDPOINTS = _weighted(
    [
        (50, ("/v1/chat/completions", "POST", 6000)),
        (20, ("/v1/embeddings", "POST", 24000)),
        (12, ("/v1/search", "GET", 3000)),
        (8, ("/v1/files", "POST", 900)),
        (6, ("/v1/files/{id}", "GET", 150000)),
        (4, ("/v1/models", "GET", 1200)),
    ]
)
_STATUS = _weighted([(90, 200), (3, 201), (2, 400), (1, 401), (1, 404), (2, 429), (0.7, 500), (0.3, 503)])
_MODELS = _weighted([(40, "gpt-4o-mini"), (25, "gpt-4o"), (20, "claude-3-5-sonnet"), (15, "llama-3.1-70b")])
_CURRENCIES = _weighted([(80, "USD"), (15, "EUR"), (5, "GBP")])
_PRICES_CENTS = (1900, 4900, 9900, 29900, 99900)

_log = math.log


def _null_rate(slug: str, column: str) -> float:
    return next(p.null_rate for p in EVENTS[slug].properties if p.column == column)


# The sparse properties' NULL shares, from the specs (the single source).
_LATENCY_NULL = _null_rate("api_call", "latency_ms")
_BYTES_NULL = _null_rate("api_call", "bytes")
_API_TIER_NULL = _null_rate("api_call", "plan_tier")
_TOKENS_TIER_NULL = _null_rate("tokens_used", "plan_tier")
_CONFIRMATION_NULL = _null_rate("payment_confirmed", "confirmation_time")

# Property generators: (rng.random, customer, timestamp) -> {column: value}.
# They draw the same number of random numbers whatever they pick, except
# where a branch is part of the modelled behaviour, which is fine because
# the draw sequence is still a pure function of the seed.
_PropertyGen = Callable[[Callable[[], float], _Customer, datetime], dict[str, Any]]


def _tier(r: Callable[[], float], customer: _Customer, null_rate: float) -> str | None:
    return None if r() < null_rate else customer.tier


def _api_call(r: Callable[[], float], customer: _Customer, ts: datetime) -> dict[str, Any]:
    endpoint, method, mean_bytes = _ENDPOINTS[1][bisect(_ENDPOINTS[0], r())]
    status = _STATUS[1][bisect(_STATUS[0], r())]
    latency = None if r() < _LATENCY_NULL else int(-180.0 * _log(1.0 - r())) + 4
    size = None if r() < _BYTES_NULL else int(-mean_bytes * _log(1.0 - r())) + 64
    return {
        "endpoint": endpoint,
        "method": method,
        "status_code": status,
        "latency_ms": latency,
        "bytes": size,
        "plan_tier": _tier(r, customer, _API_TIER_NULL),
    }


def _payment_confirmed(r: Callable[[], float], customer: _Customer, ts: datetime) -> dict[str, Any]:
    if r() < 0.6:  # a plan price, else a metered top-up
        cents = _PRICES_CENTS[int(r() * len(_PRICES_CENTS))]
    else:
        cents = 500 + int(r() * 250_000)
    confirmed = None
    if r() >= _CONFIRMATION_NULL:
        # The payment provider confirms a few seconds after the event; an
        # ISO-8601 string property, as a client would send it.
        at = ts + timedelta(milliseconds=int(r() * 5000))
        confirmed = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "amount": cents / 100,
        "currency": _CURRENCIES[1][bisect(_CURRENCIES[0], r())],
        "confirmation_time": confirmed,
    }


def _tokens_used(r: Callable[[], float], customer: _Customer, ts: datetime) -> dict[str, Any]:
    return {
        "model": _MODELS[1][bisect(_MODELS[0], r())],
        "input_tokens": int(-900.0 * _log(1.0 - r())) + 1,
        "output_tokens": int(-250.0 * _log(1.0 - r())) + 1,
        "plan_tier": _tier(r, customer, _TOKENS_TIER_NULL),
    }


_GENERATORS: dict[str, _PropertyGen] = {
    "api_call": _api_call,
    "payment_confirmed": _payment_confirmed,
    "tokens_used": _tokens_used,
}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _window_rows(
    spec: EventSpec,
    window_start: datetime,
    count: int,
    seed: int,
    population: _Population,
    now: datetime,
) -> list[dict[str, Any]]:
    """Rows of one event for one hourly window, without rows loaded after ``now``."""
    rng = random.Random(f"usage_billing.sample_data:{seed}:{spec.slug}:{window_start.isoformat()}")
    r = rng.random
    bits = rng.getrandbits
    gen = _GENERATORS[spec.slug]
    slug, name = spec.slug, spec.name
    customers, cumulative = population.customers, population.cumulative
    visitors = population.anonymous_ids
    n_visitors = len(visitors)
    # Positional timedelta(days, seconds, microseconds) is twice as fast as
    # keyword arguments, which matters at a million rows.
    td = timedelta
    no_skew = td(0)
    rows: list[dict[str, Any]] = []
    append = rows.append

    for _ in range(count):
        # Every draw happens whether or not the row survives the ``now``
        # cut, so a later ``now`` only adds rows, never changes them.
        customer = customers[bisect(cumulative, r())]
        ts = window_start + td(0, 0, int(r() * 3_600_000) * 1000)

        h = f"{bits(128):032x}"
        style = customer.id_style
        if style == "ajs":
            message_id = "ajs-" + h
        elif style == "node":
            message_id = "node-" + h
        else:
            message_id = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

        if r() < _ANONYMOUS_RATE:
            user_id = account_id = group_id = None
            anonymous_id = visitors[int(r() * n_visitors)]
        else:
            user_id = customer.user_id
            account_id = customer.account_id
            group_id = customer.group_id if r() < _GROUP_RATE else None
            anonymous_id = customer.anonymous_ids[int(r() * 4)] if r() < customer.anonymous_rate else None

        # Segment computes timestamp = receivedAt - (sentAt - originalTimestamp),
        # so a client clock skew shows in original_timestamp and sent_at only.
        skew = td(0, 0, int((r() - 0.5) * 20_000) * 1000) if r() < _CLIENT_SKEW_RATE else no_skew
        send_delay = td(0, 0, int(r() * 30_000) * 1000)
        load_lag = td(0, r() * 2400)
        u = r()
        if u < _LATE_RATE:
            if u < _VERY_LATE_RATE:
                late = td(0, 6 * 3600 + 60 + r() * 24 * 3600)
            else:
                late = td(0, 3900 + r() * (6 * 3600 - 3900))
            if r() < 0.5:
                send_delay = late  # queued offline on the device
            else:
                load_lag = late  # a failed sync, picked up by a later one
        original_timestamp = ts + skew
        sent_at = original_timestamp + send_delay
        received_at = ts + send_delay
        uuid_ts = received_at + load_lag

        ip = customer.ips[int(r() * 3)]
        props = gen(r, customer, ts)
        duplicate = r() < _DUPLICATE_RATE
        resync_lag = td(0, 600 + r() * 3 * 3600) if duplicate else None

        if uuid_ts > now:
            continue  # not loaded yet
        row = {
            "id": message_id,
            "anonymous_id": anonymous_id,
            "user_id": user_id,
            "event": slug,
            "event_text": name,
            "timestamp": ts,
            "original_timestamp": original_timestamp,
            "sent_at": sent_at,
            "received_at": received_at,
            "uuid_ts": uuid_ts,
            "context_library_name": customer.library_name,
            "context_library_version": customer.library_version,
            "context_ip": ip,
            "context_traits_account_id": account_id,
            "context_group_id": group_id,
        }
        row.update(props)
        append(row)
        if resync_lag is not None and uuid_ts + resync_lag <= now:
            again = dict(row)
            again["uuid_ts"] = uuid_ts + resync_lag
            append(again)
    return rows


@dataclass(frozen=True)
class Sample:
    """What to generate: ``hours`` hourly windows from ``start``, each with ``events_per_hour``
    distinct events of each of ``events``, for ``customers`` customers, as the warehouse holds them
    at ``now``.

    Data for one window of one event is a pure function of ``seed``, the event, the window start,
    ``events_per_hour`` and ``customers``. ``now`` defaults to the current time; pass one (or an old
    ``start``) for reproducible output.
    """

    # Start of the first window (usually an hour boundary); naive values are taken as UTC.
    start: datetime
    hours: int
    # Distinct events per window and event type, before duplicates are added and unloaded rows removed.
    events_per_hour: int
    seed: int = 0
    # Slugs of the events to generate (keys of EVENTS).
    events: Iterable[str] = tuple(EVENTS)
    # Distinct customers (user_id cus_<name>).
    customers: int = 12
    now: datetime | None = None

    def __post_init__(self) -> None:
        if self.hours < 0 or self.events_per_hour < 0 or self.customers < 1:
            raise ValueError("hours and events_per_hour must be >= 0 and customers >= 1")


def generate_rows(sample: Sample) -> dict[str, list[dict[str, Any]]]:
    """Generate Segment warehouse rows for the sample events.

    For each event and each hourly window ``[start + i h, start + (i+1) h)``,
    ``events_per_hour`` distinct events are generated with ``timestamp`` in
    the window. Rows are then shaped as described in the module docstring
    (late, duplicate, anonymous, sparse). A row is only returned if it would
    already be in the warehouse at ``now``: windows starting at or after
    ``now`` are skipped, and rows whose ``uuid_ts`` (load time) is after
    ``now`` are left out, so the most recent hour or so is incomplete, as in
    a real warehouse.

    Returns:
        Rows by event slug; each row is a dict with every column of the
        event table. Datetimes are aware UTC.

    Raises:
        ValueError: For unknown events.
    """
    specs = [_spec(slug) for slug in dict.fromkeys(sample.events)]
    start = _utc(sample.start)
    now = _utc(sample.now) if sample.now is not None else datetime.now(UTC)
    population = _population(sample.seed, sample.customers)
    out: dict[str, list[dict[str, Any]]] = {spec.slug: [] for spec in specs}
    for i in range(sample.hours):
        window_start = start + i * _HOUR
        if window_start >= now:
            break
        for spec in specs:
            out[spec.slug].extend(_window_rows(spec, window_start, sample.events_per_hour, sample.seed, population,
                                               now))
    return out


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


@dataclass
class SampleStats:
    """What was generated or loaded.

    Attributes:
        rows: Total rows, duplicates included.
        unique_events: Distinct ``id`` values.
        duplicates: ``rows - unique_events``: extra copies of an ``id``.
        anonymous: Rows with ``user_id`` NULL.
        late: Rows whose ``uuid_ts`` is more than one hour after
            ``timestamp`` (duplicate copies included).
        per_event: Rows per event slug.
    """

    rows: int = 0
    unique_events: int = 0
    duplicates: int = 0
    anonymous: int = 0
    late: int = 0
    per_event: dict[str, int] = field(default_factory=dict)

    def __iadd__(self, other: SampleStats) -> Self:
        # Only valid for disjoint sets of ids, which is what generate() adds.
        self.rows += other.rows
        self.unique_events += other.unique_events
        self.duplicates += other.duplicates
        self.anonymous += other.anonymous
        self.late += other.late
        for slug, n in other.per_event.items():
            self.per_event[slug] = self.per_event.get(slug, 0) + n
        return self


def summarize(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> SampleStats:
    """Compute :class:`SampleStats` for rows shaped like :func:`generate_rows` output."""
    stats = SampleStats()
    ids: set[str] = set()
    for slug, batch in rows.items():
        stats.per_event[slug] = len(batch)
        stats.rows += len(batch)
        for row in batch:
            ids.add(row["id"])
            if row["user_id"] is None:
                stats.anonymous += 1
            if row["uuid_ts"] - row["timestamp"] > _HOUR:
                stats.late += 1
    stats.unique_events = len(ids)
    stats.duplicates = stats.rows - stats.unique_events
    return stats


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

_COPY_CHUNK = 5_000
_INSERT_CHUNK = 10_000
_NULL = "\\N"
# COPY text format: backslash, tab and line breaks must be escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: Any) -> str:
    s = value if isinstance(value, str) else str(value)
    return s if ("\\" not in s and s.isprintable()) else s.translate(_COPY_ESCAPES)


def _copy_timestamp(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat() if value.tzinfo is not None else value.isoformat() + "+00:00"
    return _copy_text(value)


# Column-wise formatters for COPY ... FROM STDIN (text format). Whole-column
# comprehensions with the common case inlined keep the per-value cost low;
# formatting dominates the load time, not PostgreSQL.
_COPY_FORMATTERS: dict[str, Callable[[Sequence[Any]], list[str]]] = {
    "string": lambda vs: [
        _NULL if v is None else v if (v.__class__ is str and v.isprintable() and "\\" not in v) else _copy_text(v)
        for v in vs
    ],
    "integer": lambda vs: [_NULL if v is None else str(int(v)) for v in vs],
    "float": lambda vs: [_NULL if v is None else repr(float(v)) for v in vs],
    "boolean": lambda vs: [_NULL if v is None else ("t" if v else "f") for v in vs],
    "timestamp": lambda vs: [
        _NULL
        if v is None
        else v.isoformat()
        if v.__class__ is datetime and v.tzinfo is not None
        else _copy_timestamp(v)
        for v in vs
    ],
}


def _kinds(slug: str) -> list[tuple[str, str]]:
    return list(BASE_COLUMNS) + [(p.column, p.kind) for p in EVENTS[slug].properties]


def _check_keys(slug: str, batch: Sequence[Mapping[str, Any]]) -> None:
    unknown = set(batch[0]) - set(EVENTS[slug].columns)
    if unknown:
        raise ValueError(f"{slug}: unknown columns {sorted(unknown)}")


def _copy_chunks(kinds: list[tuple[str, str]], batch: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Yield the rows of ``batch`` as COPY text, a few thousand rows at a time."""
    names = [name for name, _ in kinds]
    formatters = [_COPY_FORMATTERS[kind] for _, kind in kinds]
    for lo in range(0, len(batch), _COPY_CHUNK):
        chunk = batch[lo : lo + _COPY_CHUNK]
        values = _rows_as_tuples(names, chunk)
        columns = [fmt(col) for fmt, col in zip(formatters, zip(*values, strict=True), strict=True)]
        yield "".join(["\t".join(line) + "\n" for line in zip(*columns, strict=True)])


class _CopySource:
    """File-like object for ``copy_expert`` that formats rows on demand.

    Formatting lazily, chunk by chunk, lets PostgreSQL parse one chunk while
    Python formats the next, instead of building one big buffer first.
    """

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks

    def read(self, size: int = -1) -> str:
        """Return the next chunk of COPY text ("" at the end); ``size`` is a hint."""
        return next(self._chunks, "")


def _load_copy(engine: Engine, tables: list[tuple[Table, Sequence[Mapping[str, Any]]]]) -> None:
    preparer = engine.dialect.identifier_preparer
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table, batch in tables:
            kinds = _kinds(table.name)
            columns = ", ".join(preparer.quote(name) for name, _ in kinds)
            sql = f"COPY {preparer.format_table(table)} ({columns}) FROM STDIN"
            cursor.copy_expert(sql, _CopySource(_copy_chunks(kinds, batch)))
        cursor.close()
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


def _rows_as_tuples(names: list[str], chunk: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    getter = itemgetter(*names)
    try:
        return [getter(row) for row in chunk]
    except KeyError:  # a sparse row: missing keys load as NULL
        return [tuple(row.get(name) for name in names) for row in chunk]


def _sqlite_timestamp(value: Any) -> Any:
    # SQLAlchemy's storage format for SQLite DATETIME, in UTC, so that
    # SQLAlchemy-typed reads and comparisons see what they expect.
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(" ", "microseconds")
    return value


def _load_sqlite(engine: Engine, tables: list[tuple[Table, Sequence[Mapping[str, Any]]]]) -> None:
    # Plain executemany with pre-formatted timestamps: SQLAlchemy's per-value
    # bind processing would triple the load time.
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        for table, batch in tables:
            kinds = _kinds(table.name)
            names = [name for name, _ in kinds]
            timestamps = [i for i, (_, kind) in enumerate(kinds) if kind == "timestamp"]
            columns = ", ".join(preparer.quote(name) for name in names)
            marks = ", ".join("?" * len(names))
            sql = f"INSERT INTO {preparer.format_table(table)} ({columns}) VALUES ({marks})"
            for lo in range(0, len(batch), _INSERT_CHUNK):
                values = list(zip(*_rows_as_tuples(names, batch[lo : lo + _INSERT_CHUNK]), strict=True))
                for i in timestamps:
                    # The common case, aware UTC, inline: "+00:00" is cut off.
                    values[i] = tuple(
                        v.isoformat(" ", "microseconds")[:26]
                        if v.__class__ is datetime and v.tzinfo is UTC
                        else _sqlite_timestamp(v)
                        for v in values[i]
                    )
                conn.exec_driver_sql(sql, list(zip(*values, strict=True)))


def _load_insert(engine: Engine, tables: list[tuple[Table, Sequence[Mapping[str, Any]]]]) -> None:
    with engine.begin() as conn:
        for table, batch in tables:
            names = [c.name for c in table.columns]
            for lo in range(0, len(batch), _INSERT_CHUNK):
                chunk = [
                    dict(zip(names, row, strict=True)) for row in _rows_as_tuples(names, batch[lo : lo + _INSERT_CHUNK])
                ]
                conn.execute(table.insert(), chunk)


def load(engine: Engine, schema: str, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Append rows to the event tables, in one transaction.

    On PostgreSQL with psycopg2 the rows are streamed with ``COPY ... FROM
    STDIN`` (about 15 s for a million rows); on SQLite they go through the
    driver's ``executemany`` with timestamps stored as SQLAlchemy stores them
    (naive UTC text); other databases get SQLAlchemy's ``executemany``. The
    tables must exist (:func:`create_tables`). Missing keys in a row load as
    NULL; naive datetimes are taken as UTC.

    Args:
        engine: Target database.
        schema: Source schema name.
        rows: Rows by event slug, as returned by :func:`generate_rows`.

    Raises:
        ValueError: For an unknown event, unknown columns or an unsafe schema.
    """
    metadata = MetaData()
    tables = []
    for slug, batch in rows.items():
        table = event_table(metadata, schema, slug)
        if batch:
            _check_keys(slug, batch)
            tables.append((table, batch))
    if not tables:
        return
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg2":
        _load_copy(engine, tables)
    elif engine.dialect.name == "sqlite":
        _load_sqlite(engine, tables)
    else:
        _load_insert(engine, tables)


# Rows buffered by generate() before each load.
_FLUSH_ROWS = 200_000


def generate(engine: Engine, schema: str, sample: Sample) -> SampleStats:
    """Create the tables, generate the sample's rows and load them.

    Rows are exactly those of ``generate_rows(sample)``; they are generated and loaded a few hours
    at a time so that memory stays bounded. Each load is its own transaction.

    Args:
        engine: Target database (on SQLite, with ``schema`` attached).
        schema: Source schema name, created on PostgreSQL if missing.
        sample: What to generate.

    Returns:
        Statistics of the rows loaded.
    """
    events = tuple(dict.fromkeys(sample.events))
    # One "now" for the whole run, so the chunks agree with a single call.
    now = _utc(sample.now) if sample.now is not None else datetime.now(UTC)
    create_tables(engine, schema, events)

    stats = SampleStats(per_event=dict.fromkeys(events, 0))
    pending: dict[str, list[dict[str, Any]]] = {slug: [] for slug in events}
    buffered = 0
    start = _utc(sample.start)
    windows = [w for w in (start + i * _HOUR for i in range(sample.hours)) if w < now]
    for n, window in enumerate(windows, 1):
        chunk = generate_rows(replace(sample, start=window, hours=1, events=events, now=now))
        for slug, batch in chunk.items():
            pending[slug].extend(batch)
            buffered += len(batch)
        if buffered >= _FLUSH_ROWS or n == len(windows):
            # Duplicates never cross windows, so per-flush stats add up.
            stats += summarize(pending)
            load(engine, schema, pending)
            pending = {slug: [] for slug in events}
            buffered = 0
    return stats
