"""Sending's pure parts: bisection that counts what the transport did, and key de-duplication."""

from __future__ import annotations

import numpy as np
import pytest

from usage_billing.delivery.contract import BatchOutcome, BatchRejected
from usage_billing.delivery.sending import dedupe_keys, send_resolving
from usage_billing.destinations.base import Mapped


class Refusing:
    """Refuses any batch holding a bad key as a whole, after ``retries`` retries of that request."""

    def __init__(self, bad: set[str], retries: int = 0):
        self.bad, self.retries, self.calls = bad, retries, 0

    def send(self, events, keys, backfill_id=None):
        self.calls += 1
        if self.bad & set(keys):
            raise BatchRejected("invalid event", 400, requests=self.retries + 1, retries=self.retries)
        return BatchOutcome(accepted=list(keys), requests=self.retries + 1, retries=self.retries)


@pytest.mark.parametrize(("size", "bad", "retries"), [
    (8, {"k3"}, 0),
    (8, {"k0", "k7"}, 0),
    (5, {"k2"}, 2),
    (1, {"k0"}, 1),
], ids=["one-bad-in-eight", "two-bad-at-the-ends", "retried-requests-counted", "single-event"])
def test_bisection_isolates_the_bad_events_and_counts_every_request(size, bad, retries):
    keys = [f"k{i}" for i in range(size)]
    sender = Refusing(bad, retries)
    outcome = send_resolving(sender, [{"k": k} for k in keys], keys)
    assert set(outcome.rejected) == bad and set(outcome.accepted) == set(keys) - bad
    assert outcome.requests == sender.calls * (retries + 1), "refused requests and their retries are counted"
    assert outcome.retries == sender.calls * retries
    assert outcome.bisections == sender.calls // 2 if size > 1 else outcome.bisections == 0


def test_a_second_row_with_the_same_key_is_rejected_naming_both_rows():
    mapped = Mapped(keys=["a", "b", "a"], payloads=[{}, {}, {}], message_ids=["m1", "m2", "m3"],
                    tables=["api_call"] * 3, timestamps=np.array(["2026-11-23T12:00"] * 3, dtype="datetime64[us]"))
    (rejection,) = dedupe_keys(mapped)
    assert mapped.keys == ["a", "b"] and mapped.message_ids == ["m1", "m2"]
    assert rejection.key == "a#dup:m3" and "row id=m3" in rejection.reason and "row id=m1" in rejection.reason
