"""What every destination mapping shares: the result type and value rules, in pure pandas.

A destination mapping is a pure function ``DataFrame -> Mapped``: one payload per deliverable row,
one :class:`Rejection` (with a reason a person can act on) per row that cannot make a valid event.
No Airflow import, no I/O: the tests feed it DataFrames and read the payloads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import compress

import numpy as np

from usage_billing.frames import pd
from usage_billing.sources.layout import LOADED_AT, TABLE

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SURROGATES = r"[\ud800-\udfff]"
TIMESTAMP_DTYPE = np.dtype("datetime64[us]")


@dataclass(frozen=True)
class Rejection:
    """An event that was not sent, and why. ``key`` is its ledger key (the idempotency key).

    ``customer`` is the row's billing customer when it has one (a row refused for a bad property
    still belongs to a customer), so the billing view can count rejections per customer.
    ``loaded_at`` is the row's loaded-at value: a window leaves the rejection alone until the row
    is loaded again."""

    key: str
    message_id: str
    table: str
    reason: str
    event_timestamp: datetime | None = None
    customer: str | None = None
    loaded_at: datetime | None = None


@dataclass
class Mapped:
    """The outcome of mapping one chunk: deliverable events and per-row rejections.

    ``keys[i]`` is the ledger / idempotency key of ``payloads[i]``; ``message_ids``, ``tables`` and
    ``timestamps`` describe the source row so the ledger can point back at it for a replay.
    ``timestamps`` is one numpy ``datetime64[us]`` array (UTC, ``NaT`` where missing): the delivery
    core routes and records a million of them without making a Python object per event.
    """

    keys: list[str] = field(default_factory=list)
    payloads: list[dict] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    timestamps: np.ndarray = field(default_factory=lambda: np.array([], dtype=TIMESTAMP_DTYPE))
    rejected: list[Rejection] = field(default_factory=list)
    # Each event's row loaded-at (``datetime64[us]``, UTC), when the frame had one (LOADED_AT).
    loaded_at: np.ndarray | None = None
    # Rows that cannot be sent yet (stamped further in the future than the destination accepts):
    # recorded as held, and delivered by a later run once they are due.
    held: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.payloads)

    def timestamp(self, position: int) -> datetime | None:
        """The event timestamp at ``position`` as an aware UTC datetime (None when missing)."""
        return to_datetime(self.timestamps[position])

    def loaded(self, position: int) -> datetime | None:
        """The row's loaded-at at ``position`` as an aware UTC datetime (None when unknown)."""
        return None if self.loaded_at is None else to_datetime(self.loaded_at[position])

    def rejection(self, position: int, reason: str, customer: str | None = None) -> Rejection:
        """The event at ``position`` as a rejection (or a held or queued event) for ``reason``."""
        return Rejection(key=self.keys[position], message_id=self.message_ids[position], table=self.tables[position],
                         reason=reason, event_timestamp=self.timestamp(position), customer=customer,
                         loaded_at=self.loaded(position))

    def drop(self, positions: Sequence[int]) -> None:
        """Remove the events at ``positions`` from every column."""
        gone = set(positions)
        keep = [i for i in range(len(self.keys)) if i not in gone]
        for name in ("keys", "payloads", "message_ids", "tables"):
            column = getattr(self, name)
            setattr(self, name, [column[i] for i in keep])
        self.timestamps = self.timestamps[keep]
        if self.loaded_at is not None:
            self.loaded_at = self.loaded_at[keep]


class RowProblems:
    """Collects the first problem found for each row, in the order the rules are applied."""

    def __init__(self, index: pd.Index):
        self.reason = pd.Series(pd.NA, index=index, dtype="object")
        self.held = pd.Series(False, index=index)

    def flag(self, mask: pd.Series | np.ndarray, reason: str | Callable[[pd.Index], pd.Series]) -> None:
        """Record ``reason`` for rows in ``mask`` that have no earlier problem."""
        mask = pd.Series(np.asarray(mask, dtype=bool), index=self.reason.index) & self.reason.isna()
        if mask.any():
            self.reason[mask] = reason(self.reason.index[mask]) if callable(reason) else reason

    def hold(self, mask: pd.Series | np.ndarray, reason: str | Callable[[pd.Index], pd.Series]) -> None:
        """Like :meth:`flag`, but the rows are held (sent later), not rejected."""
        mask = pd.Series(np.asarray(mask, dtype=bool), index=self.reason.index) & self.reason.isna()
        self.flag(mask, reason)
        self.held |= mask

    @property
    def ok(self) -> pd.Series:
        return self.reason.isna()


def blank(series: pd.Series) -> pd.Series:
    """True where a value is null or an empty / whitespace-only string."""
    text = series.astype("string")
    return (text.isna() | (text.str.strip() == "")).fillna(True).astype(bool)


def as_text(series: pd.Series) -> list[str | None]:
    """Values as Python strings, unchanged (numbers become their decimal text), nulls as None."""
    if pd.api.types.is_float_dtype(series.dtype):
        # 42.0 from a float column is the customer "42", not "42.0".
        series = series.map(lambda v: v if pd.isna(v) else (str(int(v)) if float(v).is_integer() else str(v)))
    text = series.astype("string")
    return text.astype(object).where(text.notna(), None).tolist()


def iso_utc(series: pd.Series) -> list[str | None]:
    """UTC timestamps as RFC 3339 strings with milliseconds and ``Z`` (Segment's own format)."""
    stamps = pd.to_datetime(series, utc=True, errors="coerce")
    # numpy formats in C; pandas' strftime goes through Python for every value.
    values = stamps.dt.tz_convert(None).to_numpy(dtype="datetime64[ms]")
    text = pd.Series(np.datetime_as_string(values, unit="ms"), index=series.index, dtype=object) + "Z"
    return text.where(stamps.notna().to_numpy(), None).tolist()


def timestamp_array(values: pd.Series | Sequence[datetime | None]) -> np.ndarray:
    """Timestamps as a UTC ``datetime64[us]`` array, ``NaT`` for nulls (naive values are UTC)."""
    if isinstance(values, np.ndarray) and values.dtype == TIMESTAMP_DTYPE:
        return values
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
    stamps = pd.to_datetime(series, utc=True, errors="coerce")
    return stamps.dt.tz_convert(None).to_numpy(dtype=TIMESTAMP_DTYPE)


def to_datetime(value: np.datetime64) -> datetime | None:
    """One element of a timestamp array as an aware UTC datetime (None for ``NaT``)."""
    if np.isnat(value):
        return None
    return pd.Timestamp(value).tz_localize(UTC).to_pydatetime()


def _scalar(value: object) -> object:
    """A JSON-ready Python scalar; raises ValueError with a short reason for anything else."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        value = int(value)
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"number {value} is not finite")
        return _scalar(int(value)) if value == value.to_integral_value() else float(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise ValueError(f"number {value} is not finite")
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        stamp = pd.Timestamp(value)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
    if isinstance(value, dict | list | tuple):
        raise ValueError(f"nested {type(value).__name__} values are not allowed")
    raise ValueError(f"unsupported value type {type(value).__name__}")


def scalar_column(
    series: pd.Series, name: str, problems: RowProblems, max_length: int | None, allow_nested: bool = False
) -> list[object]:
    """Convert a property column to JSON-ready Python values, flagging rows whose value is invalid.

    Nulls become None (the caller omits them). NaN counts as null: after a warehouse read pandas
    cannot tell a NULL from a NaN. Infinite numbers, integers beyond 64 bits, nested values (unless
    ``allow_nested``), strings longer than ``max_length`` and strings that are not valid UTF-8 are
    flagged with a reason naming the property.
    """
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype):
        return [None if v is pd.NA else v for v in series.astype("object").tolist()]
    if pd.api.types.is_float_dtype(dtype):
        values = series.astype("Float64")
        infinite = np.isinf(values.fillna(0).to_numpy(dtype="float64"))
        problems.flag(infinite, lambda idx: f"property {name}: number " + values[idx].astype(str) + " is not finite")
        out = values.astype("object").tolist()
        return [None if (v is pd.NA or v is None or (isinstance(v, float) and math.isnan(v))) else v for v in out]
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return iso_utc(series)
    if pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype):
        text = series.astype("string")
        _check_text(text, name, problems, max_length)
        return [None if v is pd.NA else v for v in text.tolist()]

    # Object columns (Decimal, JSON, mixed): check value by value.
    values: list[object] = []
    bad = np.zeros(len(series), dtype=bool)
    reasons: list[str] = []
    for position, value in enumerate(series.tolist()):
        try:
            values.append(value if allow_nested and isinstance(value, dict | list) else _scalar(value))
            reasons.append("")
        except ValueError as error:
            bad[position] = True
            reasons.append(f"property {name}: {error}")
            values.append(None)
    if bad.any():
        problems.flag(bad, lambda idx: pd.Series(reasons, index=series.index)[idx])
    _check_text(pd.Series([v if isinstance(v, str) else pd.NA for v in values], index=series.index,
                          dtype="string"), name, problems, max_length)
    return values


def without_nulls(names: Sequence[str], columns: Sequence[list], rows: int) -> list[dict]:
    """One dict per row (``rows`` of them) mapping ``names`` to the row's values from ``columns``,
    leaving out None values.

    ``dict(zip())`` runs in C; only rows holding a None (values are JSON scalars, lists or dicts,
    so ``None in row`` compares safely) pay for the filtering comprehension.
    """
    if not columns:
        return [{} for _ in range(rows)]
    return [dict(zip(names, row, strict=True)) if None not in row
            else {n: v for n, v in zip(names, row, strict=True) if v is not None}
            for row in zip(*columns, strict=True)]


def _check_text(text: pd.Series, name: str, problems: RowProblems, max_length: int | None) -> None:
    if max_length is not None:
        lengths = text.str.len()
        too_long = (lengths > max_length).fillna(False)
        problems.flag(too_long, lambda idx: f"property {name}: string of " + lengths[idx].astype(str)
                      + f" characters exceeds max_string_length {max_length}")
    try:  # one encode of the whole column finds no lone surrogate in the common case
        "".join(text.dropna().tolist()).encode("utf-8")
    except UnicodeEncodeError:
        invalid = text.str.contains(_SURROGATES, regex=True).fillna(False)
        problems.flag(invalid, f"property {name}: text is not valid UTF-8")


def check_timestamps(stamps: pd.Series, problems: RowProblems, now: datetime, future_limit: timedelta | None) -> None:
    """Reject rows with no timestamp; hold rows stamped further in the future than the destination
    accepts (``future_limit``; None: no limit), to be delivered once they are due."""
    problems.flag(stamps.isna(), "timestamp is null")
    if future_limit is None:
        return
    future = (stamps > pd.Timestamp(now + future_limit)).fillna(False)
    problems.hold(future, lambda idx: "timestamp " + stamps[idx].astype(str)
                  + f" is more than {future_limit} in the future: held until then")


def finish(frame: pd.DataFrame, keys: list[str | None], payloads: list[dict], problems: RowProblems,
           customers: list[str | None], id_column: str = "id") -> Mapped:
    """Pair the payloads of the rows without problems (in row order) with their ledger facts, and
    turn the other rows into rejections naming the row and its customer (``customers``: each row's
    billing customer as the payload would carry it; a blank one is none)."""
    ok = problems.ok.to_numpy()
    message_ids = as_text(frame[id_column])
    tables = frame[TABLE].tolist() if TABLE in frame else [""] * len(frame)
    stamps = timestamp_array(frame["timestamp"])
    loads = timestamp_array(frame[LOADED_AT]) if LOADED_AT in frame else None
    keys = [key or message_id or "" for key, message_id in zip(keys, message_ids, strict=True)]
    mapped = Mapped(keys=list(compress(keys, ok)), payloads=payloads, message_ids=list(compress(message_ids, ok)),
                    tables=list(compress(tables, ok)), timestamps=stamps[ok],
                    loaded_at=None if loads is None else loads[ok])
    assert len(mapped.keys) == len(payloads), "one payload per row without problems"
    if not ok.all():
        reasons, held = problems.reason.tolist(), problems.held.to_numpy()
        for position in np.flatnonzero(~ok):
            customer = customers[position]
            (mapped.held if held[position] else mapped.rejected).append(Rejection(
                key=keys[position], message_id=message_ids[position] or "", table=tables[position],
                reason=f"{tables[position]} row id={message_ids[position]}: {reasons[position]}",
                event_timestamp=to_datetime(stamps[position]),
                customer=customer if customer and customer.strip() else None,
                loaded_at=None if loads is None else to_datetime(loads[position]),
            ))
    return mapped
