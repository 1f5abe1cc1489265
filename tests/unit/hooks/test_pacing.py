"""Pacing holds per task in memory, and across workers when the limits live in Redis.

The pacer's decision is observed, not timed: its ``sleep`` is replaced by one that raises, so a
test sees exactly which acquisition would have had to wait.
"""

from __future__ import annotations

import uuid

import pytest

from billing_airflow.hooks.base import Pacer, parse_retry_after
from usage_billing.settings_base import DeliverySettings

REDIS = "redis://127.0.0.1:6379/7"


class WouldWait(Exception):
    pass


def refuse_to_wait(seconds: float) -> None:
    raise WouldWait(seconds)


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except Exception:
        return False


def pacer(settings: DeliverySettings, key: str | None = None, storage: str = "memory://") -> Pacer:
    return Pacer(key or f"t-{uuid.uuid4()}", settings, storage, sleep=refuse_to_wait)


def free_acquisitions(pacers: list[Pacer], cost: int = 1, limit: int = 100) -> int:
    """Acquire round-robin until one acquisition would have to wait; how many went through."""
    for count in range(limit):
        try:
            pacers[count % len(pacers)].acquire(cost)
        except WouldWait:
            return count
    return limit


def test_requests_per_second_is_enforced_in_memory():
    settings = DeliverySettings(requests_per_second=5, events_per_minute=1_000_000)
    assert free_acquisitions([pacer(settings)]) == 5


def test_events_per_minute_counts_events_not_requests():
    settings = DeliverySettings(requests_per_second=1000, events_per_minute=1000)
    limited = pacer(settings)
    limited.acquire(600)
    with pytest.raises(WouldWait):
        limited.acquire(600)  # 1,200 events would exceed 1,000 per minute


@pytest.mark.skipif(not redis_available(), reason="Redis at 127.0.0.1:6379 is not reachable")
def test_limits_in_redis_hold_across_workers_together():
    """Two pacers stand for two Celery workers: together they stay within the destination's limit."""
    settings = DeliverySettings(requests_per_second=6, events_per_minute=1_000_000)
    key = f"orb:test-{uuid.uuid4()}"
    assert free_acquisitions([pacer(settings, key, REDIS), pacer(settings, key, REDIS)]) == 6
    apart = [pacer(settings, f"{key}-a"), pacer(settings, f"{key}-b")]
    assert free_acquisitions(apart) == 12, "in memory each worker would have its own limit"


@pytest.mark.parametrize(("value", "seconds"), [("2", 2.0), ("0.5", 0.5), ("", None), ("soon", None),
                                                ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
                         ids=["seconds", "fraction", "empty", "garbage", "http-date-in-the-past"])
def test_parse_retry_after(value, seconds):
    assert parse_retry_after(value) == seconds


def test_a_large_events_limit_is_counted_in_units_and_still_enforced():
    settings = DeliverySettings(requests_per_second=1_000_000, events_per_minute=30_000)
    limited = pacer(settings)
    assert limited.unit == 3 and limited.events.amount == 10_000
    limited.acquire(29_000)
    with pytest.raises(WouldWait):
        limited.acquire(2_000)  # 31,000 events would exceed 30,000 per minute


def test_an_unlimited_benchmark_setting_keeps_the_window_small():
    settings = DeliverySettings(requests_per_second=1_000_000, events_per_minute=1_000_000_000)
    unlimited = pacer(settings)
    for _ in range(2_000):
        unlimited.acquire(500)
    assert unlimited.waited == 0.0
    assert unlimited.limiter.get_window_stats(unlimited.events, unlimited.key).remaining == Pacer.MAX_ENTRIES - 2_000
