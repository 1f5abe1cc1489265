"""The plumbing that lets reading, mapping, sending and ledger writing overlap.

* :func:`read_ahead` produces the next item of an iterator in a background thread (one chunk ahead),
  so the warehouse read and the CPU-bound mapping of the next chunk overlap the sending of this one;
* :class:`LedgerWriter` records confirmations in two background threads, so the senders keep
  sending while the ledger database writes the previous marks.

Queues between the stages are bounded, so memory does not grow with the window.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime

from usage_billing.delivery.report import DeliveryReport
from usage_billing.destinations import Destination
from usage_billing.destinations.base import Mapped, Rejection
from usage_billing.ledger import REJECTED, EventRefs, Ledger, Route, RunRef

# Ledger writes are coalesced up to this many keys and run in writer threads with at most three
# writes waiting: a crash can leave at most about five times this many confirmed-but-unmarked events,
# which the next attempt re-sends (and the destination de-duplicates by idempotency key).
MARK_EVERY = 5_000


def timed_iter(items: Iterator, report: DeliveryReport, stage: str) -> Iterator:
    """Yield from ``items``, adding the time spent producing each item to ``stage``."""
    try:
        while True:
            with report.timed(stage):
                item = next(items, None)
            if item is None:
                return
            yield item
    finally:
        close(items)


def close(items: Iterator) -> None:
    """Close a generator now (its ``finally`` blocks run: a COPY is cancelled), not when collected."""
    closer = getattr(items, "close", None)
    if closer is not None:
        closer()


_DONE = object()


def read_ahead(items: Iterator, name: str, depth: int = 1) -> Iterator:
    """Yield ``items``, producing up to ``depth`` of them ahead in a background thread.

    ``depth`` bounds the chunks held in memory: besides the one the consumer holds, at most ``depth``
    exist, produced or being produced. The producer takes a free slot before it starts the next
    item, not after (an item finished and waiting for room would be one chunk more in memory per
    stage: 35 MB of a 1M-event run's peak with 50,000-row chunks, measured). An error in the producer is
    raised here; closing this generator early stops the producer, which closes ``items``.
    """
    ready: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(items, _DONE)
                ready.put((item, None))
                if item is _DONE:
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            ready.put((_DONE, error))
        finally:
            close(items)

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            slots.release()  # the producer may start the next item while this one is used
            yield item
    finally:
        stop.set()
        while producer.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        producer.join()


class LedgerWriter:
    """Ledger writes in two background threads (two database sessions).

    A write is one statement of up to MARK_EVERY keys, and two run at once because one session alone
    cannot keep up with the senders. Writes touch disjoint keys (an event is either confirmed or
    rejected once per run), so their order does not matter. At most ``depth`` writes wait; a write
    that fails is raised in the delivering thread at its next submission or at :meth:`flush`, and
    leaving the ``with`` block flushes every write.
    """

    def __init__(self, ledger: Ledger, destination: Destination, run: RunRef, report: DeliveryReport,
                 now: Callable[[], datetime]):
        self.ledger, self.destination, self.run, self.report, self.now = ledger, destination, run, report, now
        self.depth = 3
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{destination.name}-ledger")
        self._pending: deque[Future] = deque()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        try:
            if kind is None:
                self.flush()
            else:  # already failing: record what can be recorded, keep the original error
                for future in self._pending:
                    with contextlib.suppress(Exception):
                        future.result()
                self._pending.clear()
        finally:
            self._threads.shutdown(wait=True)

    def _submit(self, write: Callable[[], None]) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()

        def timed() -> None:
            with self.report.timed("ledger_write"):
                write()
        self._pending.append(self._threads.submit(timed))

    def flush(self) -> None:
        """Wait until every submitted write is in the ledger."""
        while self._pending:
            self._pending.popleft().result()

    def delivered(self, mapped: Mapped, positions: list[int], route: Route) -> None:
        """Record the events at ``positions`` as delivered (the destination confirmed them)."""
        if not positions:
            return
        described = [self.destination.describe(mapped.payloads[p]) for p in positions]
        events = EventRefs(keys=[mapped.keys[p] for p in positions],
                           message_ids=[mapped.message_ids[p] for p in positions],
                           tables=[mapped.tables[p] for p in positions],
                           timestamps=mapped.timestamps[positions],
                           customer_ids=[d[0] for d in described], event_names=[d[1] for d in described])
        self._submit(lambda: self.ledger.mark_delivered(self.destination.name, self.run, events, self.now(), route))

    def rejected(self, rejections: list[Rejection], status: str = REJECTED) -> None:
        """Record rejected (or, with ``status=HELD``, held) events with their reasons."""
        if rejections:
            self._submit(lambda: self.ledger.mark_rejected(self.destination.name, self.run, rejections, self.now(),
                                                           status))
