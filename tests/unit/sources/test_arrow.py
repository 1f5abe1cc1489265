"""Arrow batches of any size become contract-shaped chunks of exactly chunk_size rows."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pytest

from usage_billing.sources.arrow import rechunk, to_frame


@pytest.mark.parametrize(("batch_sizes", "size", "expected"), [
    ([10], 4, [4, 4, 2]),
    ([3, 3, 3], 4, [4, 4, 1]),
    ([1] * 5, 5, [5]),
    ([7, 0, 2], 3, [3, 3, 3]),
    ([], 3, []),
], ids=["one-big-batch", "batches-straddle-chunks", "many-small-batches", "empty-batch-inside", "no-batches"])
def test_rechunk_cuts_exact_chunks_and_keeps_every_row_once(batch_sizes, size, expected):
    start, batches = 0, []
    for n in batch_sizes:
        batches.append(pa.RecordBatch.from_pydict({"n": list(range(start, start + n))}))
        start += n
    chunks = list(rechunk(batches, size))
    assert [c.num_rows for c in chunks] == expected
    assert [v for c in chunks for v in c.column("n").to_pylist()] == list(range(start))


def test_to_frame_types_as_the_contract_says():
    table = pa.table({
        "ID": pa.array(["a", None]), "N": pa.array([2**63 - 1, None], pa.int64()),
        "F": pa.array([1.5, None]), "B": pa.array([True, None]),
        "TZ": pa.array([datetime(2026, 1, 1, 12, tzinfo=UTC), None], pa.timestamp("ns", tz="America/New_York")),
        "NTZ": pa.array([datetime(2026, 1, 1, 12), None], pa.timestamp("us")),
        "D": pa.array([Decimal("1.25"), None], pa.decimal128(10, 2)),
        "J": pa.array(['{"a": [1, 2]}', None]),
        "_copies": pa.array([1, 2], pa.int8()),
    })
    frame = to_frame(table, {"ID": "id", "N": "n", "F": "f", "B": "b", "TZ": "tz", "NTZ": "ntz", "D": "d", "J": "j"},
                     "api_call", json_columns=["j"])
    assert [str(t) for t in frame.dtypes] == ["string", "Int64", "Float64", "boolean", "datetime64[us, UTC]",
                                               "datetime64[us, UTC]", "object", "object", "Int64", "str"]
    assert frame.loc[0, "tz"] == pd.Timestamp("2026-01-01T12:00Z") == frame.loc[0, "ntz"]
    assert frame.loc[0, "d"] == Decimal("1.25") and frame.loc[0, "j"] == {"a": [1, 2]}
    assert frame.loc[1, "n"] is pd.NA and frame.loc[1, "j"] is None and pd.isna(frame.loc[1, "tz"])
    assert list(frame["_table"]) == ["api_call", "api_call"]
