"""One delivery job: everything the core needs, built once per task and never changed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from usage_billing.delivery.contract import Sender
from usage_billing.destinations import Destination
from usage_billing.ledger import Ledger, RetryRejected, RunRef
from usage_billing.sources import Partition, Source, Window

if TYPE_CHECKING:
    from usage_billing.settings import Settings


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DeliveryJob:
    """A destination, its transport, the warehouse, the ledger and the run, with the knobs of one task.

    ``now`` is the clock the mapping and the ledger use (event-time rules, marks); ``clock`` paces
    the progress lines and times each delivery's report. Tests inject both.
    """

    destination: Destination
    sender: Sender
    source: Source
    ledger: Ledger
    run: RunRef
    loaded_at_column: str
    chunk_size: int
    concurrency: int
    # False for the completeness sweep: rejected events are left to a replay.
    retry_rejected: bool = True
    # Events past the destination's grace period are queued in the ledger, then sent one backfill
    # per UTC day. False: each delivery sends its own queue when it ends. True: the caller sends the
    # queue once for the whole run (the DAG's ``backfill`` task, the end of the sweep), so one late
    # day costs one backfill per run instead of one per partition.
    backfill_per_run: bool = False
    now: Callable[[], datetime] = utc_now
    clock: Callable[[], float] = time.monotonic
    progress_every: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings, destination: Destination, source: Source, ledger: Ledger,
                      sender: Sender, run: RunRef) -> DeliveryJob:
        """The job a task runs, from the configuration file and the connections it opened."""
        return cls(destination=destination, sender=sender, source=source, ledger=ledger, run=run,
                   loaded_at_column=settings.source.loaded_at_column, chunk_size=settings.source.chunk_size,
                   concurrency=destination.settings.concurrency)

    def retry_for(self, scope: Scope) -> RetryRejected:
        """Whether ``scope``'s delivery sends again what the ledger holds as rejected: a replay (chosen
        ids) always, a window only where the row was loaded again since, the sweep never."""
        if not self.retry_rejected:
            return RetryRejected.NEVER
        return RetryRejected.ALWAYS if scope.ids is not None else RetryRejected.RELOADED

    @property
    def ledger_join(self) -> bool:
        """Whether the "already delivered" filter can run inside the extraction query."""
        return self.source.kind.ledger_join and self.source.shares_database_with(self.ledger.engine)


@dataclass(frozen=True)
class Scope:
    """What one delivery covers: a partition's window, or chosen message ids (a replay)."""

    partition: Partition
    window: Window | None = None
    ids: Sequence[str] | None = None
    # Replace mode: every event read is re-sent into this replacing backfill, delivered or not,
    # and the window is on the event timestamp instead of the loaded-at column.
    replace_backfill_id: str | None = None
    # Queued late events (chosen ``ids``): what the ledger does not have yet goes into this open,
    # adding backfill.
    into_backfill_id: str | None = None
    label: str = ""
    # Chosen ``ids``: the earliest load the ledger recorded for them, a lower bound on the loaded-at
    # column that prunes the read (None: unknown for some, read unpruned).
    loaded_since: datetime | None = None

    @property
    def mode(self) -> str:
        if self.replace_backfill_id:
            return "replace"
        if self.into_backfill_id:
            return "backfill"
        return "replay_rejected" if self.ids is not None else "deliver"
