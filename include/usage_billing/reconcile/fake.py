"""An in-process destination with a read API: :class:`~usage_billing.delivery.fake.FakeSender` plus
``event_volume`` and ``search_events`` over what it holds, for reconciliation's unit tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from usage_billing.delivery.fake import FakeSender


def _hour(payload: dict) -> datetime:
    stamp = datetime.fromisoformat(str(payload["timestamp"]).replace("Z", "+00:00")).astimezone(UTC)
    return stamp.replace(minute=0, second=0, microsecond=0)


@dataclass
class FakeReadingSender(FakeSender):
    """``searched`` records the size of every search request; ``foreign`` are events some other
    system ingested (counted by the volume, found by no key of ours unless asked for)."""

    searched: list[int] = field(default_factory=list)
    foreign: dict[str, dict] = field(default_factory=dict)

    def lose(self, *keys: str) -> None:
        """Forget held events, as if the destination had lost them."""
        with self._lock:
            for key in keys:
                self.held.pop(key)

    def event_volume(self, start: datetime, end: datetime) -> dict[datetime, int]:
        with self._lock:
            counts = Counter(_hour(p) for p in [*self.held.values(), *self.foreign.values()])
        return {hour: count for hour, count in counts.items() if start <= hour < end}

    def search_events(self, keys: Sequence[str], start: datetime, end: datetime) -> set[str]:
        found: set[str] = set()
        for offset in range(0, len(keys), 500):
            chunk = keys[offset:offset + 500]
            with self._lock:
                self.searched.append(len(chunk))
                held = {k: p for k in chunk if (p := self.held.get(k) or self.foreign.get(k))}
            found |= {k for k, p in held.items() if start <= _hour(p) < end}
        return found
