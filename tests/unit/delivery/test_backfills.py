"""Backfill timeframes: inside the day, reaching just past the latest event."""

from __future__ import annotations

from datetime import UTC, datetime

from usage_billing.delivery.backfills import timeframe_for

DAY = datetime(2026, 11, 20, tzinfo=UTC)


def test_a_timeframe_ends_at_the_hour_after_the_latest_event_and_never_past_the_day():
    assert timeframe_for(DAY, DAY.replace(hour=5, minute=30)) == (DAY, DAY.replace(hour=6))
    assert timeframe_for(DAY, DAY.replace(hour=23, minute=59)) == (DAY, DAY.replace(day=21))
