"""The delivery core's threads: read-ahead (bounded, errors surface, early close stops the source)
and the ledger writer (every write lands, a failed write fails the task)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest

from usage_billing.delivery import DeliveryReport
from usage_billing.delivery.pipeline import LedgerWriter, read_ahead
from usage_billing.destinations.base import Mapped, Rejection
from usage_billing.ledger import Route, RunRef

RUN = RunRef("segment_to_orb", "manual__test")


class Source:
    """A generator of numbered chunks that records how far it was pulled and whether it was closed."""

    def __init__(self, count: int, fail_at: int | None = None):
        self.count, self.fail_at = count, fail_at
        self.produced = 0
        self.closed = threading.Event()
        self._progress = threading.Condition()

    def reached(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` items were produced (False if the producer never gets there)."""
        with self._progress:
            return self._progress.wait_for(lambda: self.produced >= count, timeout)

    def __iter__(self):
        try:
            for number in range(self.count):
                if number == self.fail_at:
                    raise RuntimeError(f"warehouse went away at chunk {number}")
                with self._progress:
                    self.produced += 1
                    self._progress.notify_all()
                yield number
        finally:
            self.closed.set()


def test_items_arrive_in_order_and_the_source_is_closed():
    source = Source(20)
    assert list(read_ahead(iter(source), "test")) == list(range(20))
    assert source.closed.is_set()


def test_a_producer_error_is_raised_to_the_consumer_after_the_items_before_it():
    received = []
    with pytest.raises(RuntimeError, match="chunk 3"):
        for item in read_ahead(iter(Source(10, fail_at=3)), "test"):
            received.append(item)
    assert received == [0, 1, 2]


def test_the_producer_stays_at_most_depth_items_ahead():
    source = Source(1_000)
    ahead = read_ahead(iter(source), "test", depth=1)
    assert next(ahead) == 0
    # One taken, one produced ahead: the producer starts no further item (which would sit in memory
    # waiting for room) until the consumer takes the next one. (The wait is a liveness guard, not a timing.)
    assert source.reached(2, timeout=30)
    assert not source.reached(3, timeout=0.5) and source.produced == 2
    assert next(ahead) == 1
    assert source.reached(3, timeout=30)
    assert not source.reached(4, timeout=0.5) and source.produced == 3
    ahead.close()


def test_closing_early_stops_the_producer_and_closes_its_source():
    source = Source(1_000)
    ahead = read_ahead(iter(source), "test-early")
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()
    assert source.closed.wait(30), "the source's finally (a COPY's cancel) must run"
    assert not any(t.name == "test-early" for t in threading.enumerate())


class RecordingLedger:
    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[tuple[str, list[str]]] = []
        self.fail_on_call = fail_on_call
        self.lock = threading.Lock()

    def _record(self, kind: str, keys: list[str]) -> None:
        with self.lock:
            self.calls.append((kind, keys))
            if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
                raise ConnectionError("ledger database unreachable")
        time.sleep(0.01)

    def mark_delivered(self, destination, run, events, now, route):
        assert len(events.keys) == len(events.message_ids) == len(events.tables) == len(events.timestamps)
        assert events.customer_ids == [f"cus_{key}" for key in events.keys], "the billing customer travels along"
        self._record("delivered", list(events.keys))

    def mark_rejected(self, destination, run, rejections, now, status="rejected"):
        self._record("rejected", [r.key for r in rejections])


def mapped(count: int) -> Mapped:
    keys = [f"k{i}" for i in range(count)]
    return Mapped(keys=keys, payloads=[{"customer": f"cus_{key}"} for key in keys], message_ids=keys, tables=["api_call"] * count,
                  timestamps=np.array(["2026-11-23T12:00:00"] * count, dtype="datetime64[us]"))


def writer(ledger: RecordingLedger) -> LedgerWriter:
    destination = SimpleNamespace(name="orb", describe=lambda payload: (payload["customer"], "API Call"))
    return LedgerWriter(ledger, destination, RUN, DeliveryReport("orb", "api_call", "w"), lambda: datetime.now(UTC))


def test_every_submitted_write_lands_before_the_block_ends():
    ledger, chunk = RecordingLedger(), mapped(100)
    with writer(ledger) as w:
        for start in range(0, 100, 10):
            w.delivered(chunk, list(range(start, start + 10)), Route())
        w.rejected([Rejection("bad", "bad", "api_call", "api_call row id=bad: no customer")])
    delivered = sorted(key for kind, keys in ledger.calls if kind == "delivered" for key in keys)
    assert delivered == sorted(chunk.keys)
    assert ("rejected", ["bad"]) in ledger.calls


def test_a_failed_write_fails_the_delivery():
    ledger, chunk = RecordingLedger(fail_on_call=2), mapped(50)
    with pytest.raises(ConnectionError, match="unreachable"), writer(ledger) as w:
        for start in range(0, 50, 10):
            w.delivered(chunk, list(range(start, start + 10)), Route())


def test_on_another_error_pending_writes_still_land_and_that_error_is_kept():
    ledger, chunk = RecordingLedger(), mapped(30)
    with pytest.raises(KeyError, match="send failed"), writer(ledger) as w:
        w.delivered(chunk, list(range(30)), Route())
        raise KeyError("send failed")
    assert [kind for kind, _ in ledger.calls] == ["delivered"]
