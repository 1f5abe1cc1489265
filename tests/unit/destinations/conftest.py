from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def segment_frame(rows: list[dict], table: str = "api_call") -> pd.DataFrame:
    """A chunk shaped like warehouse.read_events() returns it (nullable dtypes, UTC timestamps)."""
    base = {"id": "ajs-1", "user_id": "cus_acme", "anonymous_id": None, "event": table,
            "event_text": "API Call", "timestamp": "2026-11-23T11:30:00.123456Z",
            "received_at": "2026-11-23T11:30:01Z", "_copies": 1}
    records = [{**base, **row} for row in rows]
    frame = pd.DataFrame.from_records(records).convert_dtypes(dtype_backend="numpy_nullable")
    for column in ("timestamp", "received_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    frame["_table"] = table
    return frame


@pytest.fixture
def now() -> datetime:
    return NOW
