"""Pacing holds per task in memory, and across workers when the limits live in Redis."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from billing_airflow.hooks.base import Pacer, parse_retry_after
from usage_billing.settings_base import DeliverySettings

REDIS = "redis://127.0.0.1:6379/7"


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except Exception:
        return False


def hits_in_first_second(pacers: list[Pacer], attempts: int, cost: int = 1) -> int:
    """Start all pacers together; count acquisitions that complete within the first second."""
    done: list[float] = []
    start = time.monotonic()

    def work(pacer: Pacer) -> None:
        for _ in range(attempts):
            pacer.acquire(cost)
            done.append(time.monotonic() - start)

    threads = [threading.Thread(target=work, args=(p,)) for p in pacers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return sum(1 for moment in done if moment < 0.9)


def test_requests_per_second_is_enforced_in_memory():
    settings = DeliverySettings(requests_per_second=5, events_per_minute=1_000_000)
    assert hits_in_first_second([Pacer(f"t-{uuid.uuid4()}", settings)], attempts=8) == 5


def test_events_per_minute_counts_events_not_requests():
    settings = DeliverySettings(requests_per_second=1000, events_per_minute=1000)
    pacer = Pacer(f"t-{uuid.uuid4()}", settings)
    started = time.monotonic()
    pacer.acquire(600)
    assert time.monotonic() - started < 0.5
    blocked = threading.Thread(target=pacer.acquire, args=(600,), daemon=True)
    blocked.start()
    blocked.join(timeout=1.0)
    assert blocked.is_alive(), "the second 600 events would exceed 1000 events per minute"


@pytest.mark.skipif(not redis_available(), reason="Redis at 127.0.0.1:6379 is not reachable")
def test_limits_in_redis_hold_across_workers_together():
    """Two pacers stand for two Celery workers: together they stay within the destination's limit."""
    settings = DeliverySettings(requests_per_second=6, events_per_minute=1_000_000)
    key = f"orb:test-{uuid.uuid4()}"
    together = hits_in_first_second([Pacer(key, settings, REDIS), Pacer(key, settings, REDIS)], attempts=6)
    assert together == 6
    apart = hits_in_first_second([Pacer(f"{key}-a", settings), Pacer(f"{key}-b", settings)], attempts=6)
    assert apart == 12, "in memory each worker would have its own limit"


@pytest.mark.parametrize(("value", "seconds"), [("2", 2.0), ("0.5", 0.5), ("", None), ("soon", None),
                                                ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
                         ids=["seconds", "fraction", "empty", "garbage", "http-date-in-the-past"])
def test_parse_retry_after(value, seconds):
    assert parse_retry_after(value) == seconds


def test_a_large_events_limit_is_counted_in_units_and_still_enforced():
    settings = DeliverySettings(requests_per_second=1_000_000, events_per_minute=30_000)
    pacer = Pacer(f"t-{uuid.uuid4()}", settings)
    assert pacer.unit == 3 and pacer.events.amount == 10_000
    pacer.acquire(29_000)
    blocked = threading.Thread(target=pacer.acquire, args=(2_000,), daemon=True)
    blocked.start()
    blocked.join(timeout=1.0)
    assert blocked.is_alive(), "29,000 + 2,000 events would exceed 30,000 events per minute"


def test_an_unlimited_benchmark_setting_keeps_the_window_small():
    settings = DeliverySettings(requests_per_second=1_000_000, events_per_minute=1_000_000_000)
    pacer = Pacer(f"t-{uuid.uuid4()}", settings)
    for _ in range(2_000):
        pacer.acquire(500)
    assert pacer.waited == 0.0
    assert pacer.limiter.get_window_stats(pacer.events, pacer.key).remaining == Pacer.MAX_ENTRIES - 2_000
