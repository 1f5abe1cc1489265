"""Late data for Orb: events past the grace period go through Orb backfills.

Orb refuses events whose timestamp is older than ``now - grace_period`` (12 hours by default)
unless they arrive inside a backfill (orb-api-notes.md sections 2.3 and 3): create a backfill for
the covering timeframe, ingest with ``backfill_id``, close it; the events become visible when it is
reflected, and every close makes Orb recompute the invoices it touches. So:

* a delivery does not send such events itself: it queues them in the ledger (status ``queued``),
  and :func:`usage_billing.delivery.runs.send_queued` sends them once for the whole run, grouped by
  UTC day of their timestamp: **one backfill per day per run**, whatever the number of partitions
  and chunks that found them;
* a per-day lock in the ledger database serialises the tasks that need a backfill for the same day,
  so a backfill is never closed while another task still ingests into it;
* a pending backfill already covering the timeframe (left by a task that died before closing it) is
  reused; one that overlaps without covering is closed first, then a new one is created.

``replace_existing_events`` is false for late data (existing events stay) and true only in
replace mode, where a run re-sends every event of its window to re-bill a period.

Lock order, to never deadlock: a day's lock is taken before a partition's (a backfill's delivery
reads its events under the partition lock), never the other way round.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

from usage_billing.delivery.contract import BackfillApi
from usage_billing.delivery.job import DeliveryJob

log = logging.getLogger(__name__)

DAY = timedelta(days=1)


def day_of(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def timeframe_for(day: datetime, latest: datetime) -> tuple[datetime, datetime]:
    """A timeframe inside ``day`` that covers every event up to ``latest``: from the day's start
    to the end of the hour after ``latest`` (never past the day), so it reaches little beyond the
    grace boundary."""
    end = latest.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return day, min(day + DAY, end)


@contextlib.contextmanager
def day_lock(job: DeliveryJob, day: datetime) -> Iterator[None]:
    """The lock of one UTC day's backfills of the job's destination."""
    with job.ledger.lock(f"{job.destination.name}:backfill:{day:%Y-%m-%d}"):
        yield


@contextlib.contextmanager
def open_backfill(job: DeliveryJob, start: datetime, end: datetime, replace: bool) -> Iterator[dict]:
    """Open (or reuse) a backfill for ``[start, end)``, yield it, then close it; the caller holds
    the day's lock. If the body raises, the backfill stays pending: the next try reuses it."""
    run, destination = job.run, job.destination.name
    api: BackfillApi = job.sender  # type: ignore[assignment]  # the destination declares backfills
    backfill = api.open_backfill(start, end, replace)
    job.ledger.record_backfill(destination, backfill, run)
    log.info("%s: backfill %s open for [%s, %s), replace_existing_events=%s", destination, backfill["id"],
             start.isoformat(), end.isoformat(), replace)
    yield backfill
    closed = api.close_backfill(backfill["id"])
    job.ledger.record_backfill(destination, closed, run)
    log.info("%s: backfill %s closed: %s", destination, backfill["id"], closed.get("status"))


@contextlib.contextmanager
def backfill_session(job: DeliveryJob, start: datetime, end: datetime, replace: bool) -> Iterator[dict]:
    """Hold the day's lock, open (or reuse) a backfill for ``[start, end)``, yield it, then close it."""
    with day_lock(job, start), open_backfill(job, start, end, replace) as backfill:
        yield backfill
