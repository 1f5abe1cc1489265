"""Arrow result batches into the frames the delivery core expects, in chunks of a fixed size.

Snowflake (``fetch_arrow_batches``) and BigQuery (the Storage Read API) both hand results over as Arrow
record batches whose sizes the service picks. The core wants chunks of at most ``chunk_size`` rows in
one shape (see :mod:`usage_billing.sources.base`), so batches are sliced and re-joined here: memory
holds one chunk plus the batch being sliced, never the whole result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping

import pyarrow as pa

from usage_billing.frames import pd
from usage_billing.sources.layout import COPIES, TABLE

# Arrow types to the pandas dtypes of the contract. Strings stay Python-backed (see usage_billing.frames).
_DTYPES: list[tuple[Callable[[pa.DataType], bool], Callable[[], object]]] = [
    (pa.types.is_boolean, pd.BooleanDtype),
    (pa.types.is_integer, pd.Int64Dtype),
    (pa.types.is_floating, pd.Float64Dtype),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), lambda: pd.StringDtype("python")),
]


def _types_mapper(arrow_type: pa.DataType) -> object | None:
    for matches, dtype in _DTYPES:
        if matches(arrow_type):
            return dtype()
    return None  # timestamps, decimals and the rest: pandas' own conversion, fixed up below


def rechunk(batches: Iterable[pa.RecordBatch | pa.Table], size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last one shorter) from batches of any size."""
    pending: list[pa.Table] = []
    held = 0
    for batch in batches:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        offset = 0
        while offset < table.num_rows:
            take = min(size - held, table.num_rows - offset)
            pending.append(table.slice(offset, take))
            held += take
            offset += take
            if held == size:
                yield pa.concat_tables(pending).combine_chunks()
                pending, held = [], 0
    if held:
        yield pa.concat_tables(pending).combine_chunks()


def to_frame(table: pa.Table, names: Mapping[str, str], event_table: str,
             json_columns: Iterable[str] = ()) -> pd.DataFrame:
    """One chunk in the contract's shape.

    ``names`` maps the result's column names (the warehouse's case) to Segment's lower-case names,
    ``_copies`` included. Timestamps become UTC-aware (``datetime64[us, UTC]``, as the PostgreSQL
    reader returns them): zoned values are converted, naive ones (Snowflake TIMESTAMP_NTZ, Redshift
    TIMESTAMP) are taken as UTC, which is what Segment writes. Integers that overflow 64 bits and
    decimals stay Python objects, and JSON text (Snowflake VARIANT) is parsed, so the mapping judges
    those values one by one.
    """
    frame = table.to_pandas(types_mapper=_types_mapper, timestamp_as_object=False, coerce_temporal_nanoseconds=False)
    frame.columns = [names.get(c, c) for c in table.column_names]
    for name, field in zip(frame.columns, table.schema, strict=True):
        if pa.types.is_timestamp(field.type):
            column = frame[name]
            column = column.dt.tz_convert("UTC") if column.dt.tz is not None else column.dt.tz_localize("UTC")
            frame[name] = column.astype("datetime64[us, UTC]")
        elif pa.types.is_date(field.type):
            frame[name] = pd.to_datetime(frame[name], utc=True).astype("datetime64[us, UTC]")
    for name in json_columns:
        if name in frame:
            frame[name] = pd.Series([None if v is None or v is pd.NA else json.loads(v) for v in frame[name]],
                                    index=frame.index, dtype="object")
    if COPIES in frame:
        frame[COPIES] = frame[COPIES].astype("Int64")
    frame[TABLE] = event_table
    return frame
