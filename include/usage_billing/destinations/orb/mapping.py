"""Segment track rows -> Orb ingestion events, exactly as Segment's Orb destination maps them.

The rules (``../shared/reference/segment-orb-destination.md``, Orb's OpenAPI ``IngestEvent``):

* ``event_name`` from ``event_name_field`` (default ``event``: the original event name, which the
  warehouse keeps in ``event_text``; the ``event`` column is only its snake_case slug);
* ``idempotency_key`` from ``idempotency_key_field`` (default ``messageId``, the ``id`` column);
* ``external_customer_id`` from ``external_customer_id_field`` (required, no default);
* ``timestamp``: the Segment ``timestamp`` in UTC with ``Z``; Orb refuses events more than five
  minutes in the future, so those are held here (and sent by a later run once due), not sent;
* ``properties``: only keys named in ``properties_mapping``, renamed; unmapped keys are dropped so
  unwanted or sensitive data never reaches Orb. Values must be string, number or boolean; nulls are
  omitted; integers stay integers.

A row that cannot make a valid event becomes a :class:`~usage_billing.destinations.base.Rejection`
naming the row and the setting, and the rest of the chunk is still mapped.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from usage_billing.destinations.base import (
    Mapped,
    RowProblems,
    as_text,
    blank,
    check_timestamps,
    finish,
    iso_utc,
    scalar_column,
    without_nulls,
)
from usage_billing.destinations.kind import Destination
from usage_billing.destinations.orb import KIND
from usage_billing.destinations.orb.settings import OrbSettings
from usage_billing.frames import pd
from usage_billing.sources.layout import column_for, property_column

FUTURE_TOLERANCE = timedelta(minutes=5)


def required_columns(settings: OrbSettings, available: list[str]) -> list[str]:
    """The warehouse columns this mapping reads (those that exist in the table)."""
    wanted = ["id", "timestamp", "event_text", "event",
              column_for(settings.event_name_field),
              column_for(settings.external_customer_id_field),
              column_for(settings.idempotency_key_field)]
    wanted += [property_column(source) for source in settings.properties_mapping]
    return [c for c in dict.fromkeys(wanted) if c in available]


def map_events(frame: pd.DataFrame, settings: OrbSettings, now: datetime) -> Mapped:
    """Map a chunk of one event table to Orb events and per-row rejections."""
    problems = RowProblems(frame.index)

    def field(setting: str, segment_field: str) -> pd.Series:
        column = column_for(segment_field)
        if column not in frame:
            problems.flag(pd.Series(True, index=frame.index),
                          f"{setting} {segment_field!r} (column {column}) does not exist in this table")
            return pd.Series(pd.NA, index=frame.index, dtype="string")
        return frame[column]

    key_series = field("idempotency_key_field", settings.idempotency_key_field)
    problems.flag(blank(key_series), f"idempotency_key_field {settings.idempotency_key_field!r} "
                                     f"(column {column_for(settings.idempotency_key_field)}) is empty")
    customer = field("external_customer_id_field", settings.external_customer_id_field)
    problems.flag(blank(customer), f"no external customer ID: external_customer_id_field "
                                   f"{settings.external_customer_id_field!r} "
                                   f"(column {column_for(settings.external_customer_id_field)}) is empty")
    event_name = field("event_name_field", settings.event_name_field)
    problems.flag(blank(event_name), f"event_name_field {settings.event_name_field!r} "
                                     f"(column {column_for(settings.event_name_field)}) is empty")
    check_timestamps(frame["timestamp"], problems, now, FUTURE_TOLERANCE)

    names, columns = [], []
    for source, target in settings.properties_mapping.items():
        column = property_column(source)
        if column in frame:  # Segment creates a column only once a non-null value arrives.
            names.append(target)
            columns.append(scalar_column(frame[column], source, problems, settings.max_string_length))

    keys = as_text(key_series)
    customers = as_text(customer)
    event_names = as_text(event_name)
    stamps = iso_utc(frame["timestamp"])
    properties = without_nulls(names, columns, len(frame))
    ok = problems.ok.to_numpy()
    payloads = [
        {"event_name": name, "idempotency_key": key, "external_customer_id": customer, "timestamp": stamp,
         "properties": props}
        for good, name, key, customer, stamp, props in zip(ok, event_names, keys, customers, stamps, properties,
                                                            strict=True)
        if good
    ]
    return finish(frame, keys, payloads, problems, customers)


def destination(config: OrbSettings) -> Destination:
    """Orb bound to one configuration (``KIND.build`` names this function)."""
    fields = (("external_customer_id_field", config.external_customer_id_field,
               column_for(config.external_customer_id_field), True),
              *(("properties_mapping", s, property_column(s), False) for s in config.properties_mapping))
    return Destination(
        name=KIND.name, settings=config,
        map_events=lambda frame, now: map_events(frame, config, now),
        required_columns=lambda columns: required_columns(config, columns),
        mapped_fields=fields,
        describe=lambda payload: (payload["external_customer_id"], payload["event_name"]),
        capabilities=KIND.capabilities,
        key_column=column_for(config.idempotency_key_field),
        # The margin covers the time between mapping an event and Orb receiving it (retries).
        grace=config.grace_period - config.grace_margin,
        future_limit=FUTURE_TOLERANCE,
        unknown_customers=config.unknown_customers)
