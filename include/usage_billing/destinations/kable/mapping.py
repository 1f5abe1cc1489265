"""Segment track rows -> Kable usage events, exactly as Segment's Kable destination maps them.

The rules (``../shared/reference/segment-kable-destination.md``, ``kable-api-notes.md`` section 8):

* ``clientId`` from ``client_id_field`` (default ``userId``; dot notation for nested fields, e.g.
  ``context.groupId`` or ``properties.customerId``); a row without one is rejected;
* ``timestamp``: the Segment ``timestamp``, RFC 3339 in UTC with ``Z``;
* ``transactionId``: the Segment ``messageId`` (column ``id``), Kable's idempotency key;
* ``data``: the event's properties. Keys named in ``properties_mappings`` are renamed
  (``segmentX -> kableX``; ``nested.field -> dimension`` reaches the flattened warehouse column
  ``nested_field``); every other property passes through unchanged. Null values are omitted.

The warehouse only keeps snake_cased column names, so a pass-through property arrives under its
column name (``objectCount`` -> ``object_count``); map it explicitly to keep the camelCase key.
Kable events carry no event name: ``event_name_key`` (optional) adds it to ``data``.
"""

from __future__ import annotations

from datetime import datetime

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
from usage_billing.destinations.kable import KIND
from usage_billing.destinations.kable.settings import KableSettings
from usage_billing.destinations.kind import Destination
from usage_billing.frames import pd
from usage_billing.sources.layout import column_for, is_property_column, property_column


def required_columns(settings: KableSettings, available: list[str]) -> list[str]:
    """The warehouse columns this mapping reads: identity, time, and every property column."""
    wanted = ["id", "timestamp", "event_text", column_for(settings.client_id_field)]
    wanted += [property_column(source) for source in settings.properties_mappings]
    wanted += [c for c in available if is_property_column(c)]
    return [c for c in dict.fromkeys(wanted) if c in available]


def data_keys(settings: KableSettings, columns: list[str]) -> list[tuple[str, str]]:
    """(column, data key) pairs: mapped columns renamed, other property columns passed through."""
    renamed = {property_column(source): target for source, target in settings.properties_mappings.items()}
    pairs = [(column, target) for column, target in renamed.items() if column in columns]
    pairs += [(column, column) for column in columns if is_property_column(column) and column not in renamed]
    return pairs


def map_events(frame: pd.DataFrame, settings: KableSettings, now: datetime) -> Mapped:
    """Map a chunk of one event table to Kable events and per-row rejections."""
    problems = RowProblems(frame.index)
    client_column = column_for(settings.client_id_field)
    if client_column in frame:
        client = frame[client_column]
        problems.flag(blank(client), f"no client ID: client_id_field {settings.client_id_field!r} "
                                     f"(column {client_column}) is empty")
    else:
        client = pd.Series(pd.NA, index=frame.index, dtype="string")
        problems.flag(pd.Series(True, index=frame.index),
                      f"client_id_field {settings.client_id_field!r} (column {client_column}) "
                      f"does not exist in this table")
    problems.flag(blank(frame["id"]), "messageId (column id) is empty: no transactionId")
    check_timestamps(frame["timestamp"], problems, now, settings.future_event_limit)

    pairs = data_keys(settings, [c for c in frame.columns if not c.startswith("_")])
    names = [target for _, target in pairs]
    columns = [scalar_column(frame[column], column, problems, settings.max_string_length, allow_nested=True)
               for column, _ in pairs]
    if settings.event_name_key:
        names.append(settings.event_name_key)
        columns.append(as_text(frame["event_text"]) if "event_text" in frame else [None] * len(frame))

    keys = as_text(frame["id"])
    clients = as_text(client)
    stamps = iso_utc(frame["timestamp"])
    data = without_nulls(names, columns, len(frame))
    ok = problems.ok.to_numpy()
    payloads = [
        {"clientId": client, "timestamp": stamp, "transactionId": key, "data": values}
        for good, client, stamp, key, values in zip(ok, clients, stamps, keys, data, strict=True)
        if good
    ]
    return finish(frame, keys, payloads, problems, clients)


def destination(config: KableSettings) -> Destination:
    """Kable bound to one configuration (``KIND.build`` names this function)."""
    fields = (("client_id_field", config.client_id_field, column_for(config.client_id_field), True),
              *(("properties_mappings", s, property_column(s), False) for s in config.properties_mappings))
    name_key = config.event_name_key
    return Destination(
        name=KIND.name, settings=config,
        map_events=lambda frame, now: map_events(frame, config, now),
        required_columns=lambda columns: required_columns(config, columns),
        mapped_fields=fields,
        describe=lambda payload: (payload["clientId"], payload["data"].get(name_key) if name_key else None),
        old_event_warning=config.late_event_warning,
        future_limit=config.future_event_limit)
