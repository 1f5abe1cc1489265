"""Segment's Warehouses layout, the same on every warehouse: field names to columns, windows, partitions.

Segment lands every ``track`` call in ``<schema>.<event_table>``: the ``tracks`` base columns
(``id`` = messageId, ``user_id``, ``event`` = slug, ``event_text`` = original name, ``timestamp``,
``received_at``, ``uuid_ts``, ``context_*``...) plus one snake_cased column per property, with
nested objects flattened with ``_``. Settings name fields the way Segment does (``userId``,
``properties.amount``, ``context.traits.accountId``); :func:`column_for` turns them into columns.
Column names here are Segment's lower-case ones; a source whose warehouse stores another case
(Snowflake folds unquoted identifiers to upper case) translates at its edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from usage_billing.naming import flatten_path

# Segment spec field -> warehouse column. `event` resolves to `event_text`, the original event
# name, because that is what Segment's own destinations send; the `event` column holds the slug.
SPEC_FIELDS = {
    "messageId": "id",
    "userId": "user_id",
    "anonymousId": "anonymous_id",
    "event": "event_text",
    "timestamp": "timestamp",
    "originalTimestamp": "original_timestamp",
    "sentAt": "sent_at",
    "receivedAt": "received_at",
}

# Columns Segment writes on every track row; everything else in an event table is a property.
BASE_COLUMNS = frozenset({
    "id", "anonymous_id", "user_id", "event", "event_text", "timestamp", "original_timestamp",
    "sent_at", "received_at", "uuid", "uuid_ts", "loaded_at",
})

# Internal column names added to every extracted frame.
COPIES = "_copies"
TABLE = "_table"
# The row's loaded-at value, under one name whatever ``source.loaded_at_column`` is (added by the
# delivery before mapping; the ledger records it with a rejection).
LOADED_AT = "_loaded_at"


def column_for(field: str) -> str:
    """The warehouse column Segment writes for a field named the Segment way.

    ``userId`` -> ``user_id``; ``messageId`` -> ``id``; ``event`` -> ``event_text``;
    ``amount`` and ``properties.amount`` -> ``amount``; ``plan.tier`` -> ``plan_tier``;
    ``context.traits.accountId`` -> ``context_traits_account_id``.
    """
    field = field.strip()
    if not field:
        raise ValueError("empty field name")
    if field in SPEC_FIELDS:
        return SPEC_FIELDS[field]
    if field.startswith("properties."):
        field = field[len("properties."):]
    column = flatten_path(field)
    if not column:
        raise ValueError(f"{field!r} does not name a warehouse column")
    return column


def property_column(path: str) -> str:
    """The column of a *property* named in a properties mapping (``segmentX``, ``nested.field``).

    Mapping keys name event properties, so ``messageId`` here is ``properties.messageId``
    (column ``message_id``), not the Segment messageId. An explicit ``context.`` path still works.
    """
    path = path.strip()
    if path.startswith("context."):
        return column_for(path)
    return column_for(path if path.startswith("properties.") else f"properties.{path}")


def is_property_column(column: str) -> bool:
    """True for columns that hold event properties rather than Segment's own fields."""
    return column not in BASE_COLUMNS and not column.startswith("context_") and not column.startswith("_")


@dataclass(frozen=True)
class Window:
    """A half-open ``[start, end)`` interval on the loaded-at column, widened back by the lookback."""

    start: datetime
    end: datetime
    lookback: timedelta = timedelta(0)

    @property
    def scan_start(self) -> datetime:
        return self.start - self.lookback

    def to_dict(self) -> dict:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(),
                "lookback": self.lookback.total_seconds()}

    @classmethod
    def from_dict(cls, data: dict) -> Window:
        return cls(datetime.fromisoformat(data["start"]), datetime.fromisoformat(data["end"]),
                   timedelta(seconds=data.get("lookback", 0)))

    def __str__(self) -> str:
        text = f"[{self.start:%Y-%m-%d %H:%M}, {self.end:%Y-%m-%d %H:%M}) UTC"
        if self.lookback:
            text += f" + lookback {self.lookback} (scan from {self.scan_start:%Y-%m-%d %H:%M})"
        return text


@dataclass(frozen=True)
class Partition:
    """One independently deliverable slice of a window: an event table and an ``id`` hash bucket."""

    table: str
    bucket: int = 0
    buckets: int = 1

    def __str__(self) -> str:
        return self.table if self.buckets == 1 else f"{self.table}#{self.bucket}/{self.buckets}"

    def to_dict(self) -> dict:
        return {"table": self.table, "bucket": self.bucket, "buckets": self.buckets}

    @classmethod
    def from_dict(cls, data: dict) -> Partition:
        return cls(table=data["table"], bucket=int(data.get("bucket", 0)), buckets=int(data.get("buckets", 1)))

