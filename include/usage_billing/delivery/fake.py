"""An in-process destination: a ``Sender`` (and ``BackfillApi``) that keeps what it accepted in memory.

For the core's unit tests and for demos without an HTTP server. It de-duplicates by idempotency key
like Orb and Kable, refuses a whole batch that holds an event it is told to refuse (so the core
bisects), fails chosen requests with a transient error, and counts every call.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from usage_billing.delivery.contract import BatchOutcome, BatchRejected, TransientDeliveryError


@dataclass
class FakeSender:
    """``refuse(payload)`` returns a reason to refuse an event, or None; the requests numbered in
    ``fail_requests`` (1 is the first) fail with TransientDeliveryError, as when retries run out;
    ``reject_individually`` names the refused events in the response (Orb's validation_failed)
    instead of refusing the batch whole."""

    refuse: Callable[[dict], str | None] = lambda payload: None
    fail_requests: set[int] = field(default_factory=set)
    reject_individually: bool = False
    held: dict[str, dict] = field(default_factory=dict)
    # How often each key was accepted: a destination de-duplicates, so a count above one means the
    # core sent a delivered event again (tests assert it never does outside a retry).
    accepted_counts: Counter = field(default_factory=Counter)
    requests: int = 0
    batches: list[int] = field(default_factory=list)
    backfills: dict[str, dict] = field(default_factory=dict)
    # The billing customers that exist (None: every customer exists).
    customers: set[str] | None = None
    lookups: list[str] = field(default_factory=list)
    in_backfill: dict[str, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send(self, events: list[dict], keys: list[str], backfill_id: str | None = None) -> BatchOutcome:
        with self._lock:
            self.requests += 1
            if self.requests in self.fail_requests:
                raise TransientDeliveryError("fake: service unavailable (gave up after 1 attempts)")
            refused = {k: reason for k, e in zip(keys, events, strict=True) if (reason := self.refuse(e))}
            if refused and not self.reject_individually:
                raise BatchRejected(f"invalid event: {next(iter(refused.values()))}", 400)
            self.batches.append(len(events))
            for key, event in zip(keys, events, strict=True):
                if key not in refused:
                    self.held.setdefault(key, event)
                    self.accepted_counts[key] += 1
                    if backfill_id:
                        self.in_backfill.setdefault(backfill_id, []).append(key)
            return BatchOutcome(accepted=[k for k in keys if k not in refused], rejected=refused)

    def customer_exists(self, external_id: str) -> bool:
        with self._lock:
            self.lookups.append(external_id)
            return self.customers is None or external_id in self.customers

    def open_backfill(self, start: datetime, end: datetime, replace: bool) -> dict:
        with self._lock:
            backfill = {"id": f"bf_{len(self.backfills) + 1}", "status": "pending", "timeframe_start": start,
                        "timeframe_end": end, "replace_existing_events": replace}
            self.backfills[backfill["id"]] = backfill
            return dict(backfill)

    def close_backfill(self, backfill_id: str) -> dict:
        with self._lock:
            self.backfills[backfill_id]["status"] = "reflected"
            return dict(self.backfills[backfill_id])
