"""The transport contract between the delivery core and a destination's hook.

This is the only module of the core that hooks import. A hook implements :class:`Sender` (and
:class:`BackfillApi` when its destination declares backfills); it reports what the destination said
as a :class:`BatchOutcome` or raises one of the errors below, which say what the core does next:

* :class:`BatchRejected`: the destination refused the whole request (a 4xx) without naming the bad
  events; the core bisects the batch until they are isolated, so good events are still delivered;
* :class:`TransientDeliveryError`: retries ran out on a retryable failure (429, 5xx, timeouts); the
  core marks what was confirmed and fails the task, whose next try re-sends the rest;
* :class:`FatalDeliveryError`: no retry can fix it (bad credentials, wrong URL); the task fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


class BatchRejected(Exception):
    """The destination refused the whole request (4xx) without saying which events are bad.

    ``requests`` and ``retries`` say what the transport did before the refusal, so the task's
    summary counts every request that was made."""

    def __init__(self, message: str, status: int | None = None, *, requests: int = 1, retries: int = 0):
        super().__init__(message)
        self.message = message
        self.status = status
        self.requests = requests
        self.retries = retries


class TransientDeliveryError(Exception):
    """Retries ran out on a retryable failure: the batch's outcome is unknown or negative."""


class FatalDeliveryError(Exception):
    """A failure no retry or bisection can fix (bad credentials, wrong URL)."""


class DeliveryFailed(Exception):
    """Raised after marking what was confirmed, so the task fails and its next try sends the rest."""


@dataclass
class BatchOutcome:
    """What the destination said about one request's events, and what the transport did to hear it."""

    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    requests: int = 1
    bisections: int = 0

    def merge(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(self.accepted + other.accepted, {**self.rejected, **other.rejected},
                            self.retries + other.retries, self.requests + other.requests,
                            self.bisections + other.bisections)


class Sender(Protocol):
    """Transport for one destination (implemented by the destination's Airflow hook)."""

    def send(self, events: list[dict], keys: list[str], backfill_id: str | None = None) -> BatchOutcome:
        """POST one batch (inside a backfill when ``backfill_id`` is given); retry transient
        failures; raise BatchRejected / TransientDeliveryError / FatalDeliveryError as documented."""


class BackfillApi(Protocol):
    """Backfills, for destinations that declare them (Orb)."""

    def open_backfill(self, start: datetime, end: datetime, replace: bool) -> dict:
        """Create a pending backfill for ``[start, end)``, or reuse a pending one covering it."""

    def close_backfill(self, backfill_id: str) -> dict:
        """Close a backfill so the destination reflects its events; returns the backfill object."""


class CustomerDirectory(Protocol):
    """Customer lookups, for destinations that declare them (Orb)."""

    def customer_exists(self, external_id: str) -> bool:
        """Whether the destination has a billing customer with this id (cached per task)."""
