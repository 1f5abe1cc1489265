"""Sending the events of a mapped chunk: ledger filter, key de-duplication, backfill routing, batches,
bisection of refused batches, and marking what the destination confirmed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from usage_billing.delivery.contract import (
    BatchOutcome,
    BatchRejected,
    CustomerDirectory,
    DeliveryFailed,
    FatalDeliveryError,
    Sender,
    TransientDeliveryError,
)
from usage_billing.delivery.job import DeliveryJob, Scope
from usage_billing.delivery.pipeline import MARK_EVERY, LedgerWriter
from usage_billing.delivery.report import DeliveryReport
from usage_billing.destinations.base import Mapped, Rejection
from usage_billing.ledger import HELD, QUEUED, RetryRejected, Route, generic_reason
from usage_billing.ledger.store import unchanged_since

log = logging.getLogger(__name__)


def dedupe_keys(mapped: Mapped) -> list[Rejection]:
    """Keep the first event per idempotency key; a second row with the same key is rejected.

    Orb refuses a whole batch holding one key twice with different bodies, and the ledger is keyed
    on it, so a key collision (a custom idempotency_key_field that is not unique) must stop here.
    """
    seen: dict[str, int] = {}
    drop: list[int] = []
    for position, key in enumerate(mapped.keys):
        if key in seen:
            drop.append(position)
        else:
            seen[key] = position
    rejections = [
        Rejection(key=f"{mapped.keys[p]}#dup:{mapped.message_ids[p]}", message_id=mapped.message_ids[p],
                  table=mapped.tables[p], event_timestamp=mapped.timestamp(p), loaded_at=mapped.loaded(p),
                  reason=f"{mapped.tables[p]} row id={mapped.message_ids[p]}: idempotency key {mapped.keys[p]!r} "
                         f"is also the key of row id={mapped.message_ids[seen[mapped.keys[p]]]}; keys must be unique")
        for p in drop]
    if drop:
        mapped.drop(drop)
    return rejections


def send_resolving(sender: Sender, events: list[dict], keys: list[str], backfill_id: str | None = None) -> BatchOutcome:
    """Send a batch; if the destination refuses it whole, bisect until the bad events are isolated.

    Every request the transport made is counted, including the refused ones and their retries."""
    try:
        return sender.send(events, keys, backfill_id) if backfill_id else sender.send(events, keys)
    except BatchRejected as error:
        if len(events) == 1:
            return BatchOutcome(rejected={keys[0]: error.message}, requests=error.requests, retries=error.retries)
        log.warning("the destination refused a batch of %d events as a whole (HTTP %s: %s); bisecting it to "
                    "isolate the events it refuses", len(events), error.status, error.message[:300])
        middle = len(events) // 2
        left = send_resolving(sender, events[:middle], keys[:middle], backfill_id)
        right = send_resolving(sender, events[middle:], keys[middle:], backfill_id)
        outcome = left.merge(right)
        outcome.requests += error.requests
        outcome.retries += error.retries
        outcome.bisections += 1
        return outcome


@dataclass
class _InFlight:
    keys: list[str]
    future: Future


class Sending:
    """Delivers the mapped chunks of one scope, ``job.concurrency`` requests at a time."""

    def __init__(self, job: DeliveryJob, writer: LedgerWriter, pool: ThreadPoolExecutor, report: DeliveryReport):
        self.job, self.writer, self.pool, self.report = job, writer, pool, report
        self._last_progress = job.clock()

    def chunk(self, mapped: Mapped, rejections: list[Rejection], scope: Scope, filtered: bool) -> None:
        """Record the chunk's rejections and send its events (those the ledger does not already
        have, unless the extraction query already left those out: ``filtered``)."""
        retry = self.job.retry_for(scope)
        before = self.rejected_before(rejections)
        if retry is RetryRejected.RELOADED and before:
            # A rejection of the same load of its row is settled: skipped, not marked again (where
            # the ledger filter runs inside the extraction query such rows are not even read).
            news = [r for r in rejections if not unchanged_since(before.get(r.key), r.loaded_at)]
            self.report.already_delivered += len(rejections) - len(news)
            rejections = news
        self.report.mapping_rejected += len(rejections)
        self.reject(rejections, before=before)
        if mapped.held:
            self.report.held += len(mapped.held)
            self.writer.rejected(mapped.held, HELD)
        everything = np.arange(len(mapped.keys))
        if scope.replace_backfill_id:
            # Replace mode re-sends every event of the window into one replacing backfill; the
            # ledger keeps the earlier delivery of each event in delivery_history.
            self.send(mapped, everything.tolist(), Route("replace", scope.replace_backfill_id))
            return
        if filtered:
            todo = everything
        else:
            self.writer.flush()  # this run's own earlier marks count too
            with self.report.timed("ledger_filter"):
                known = self.job.ledger.known_keys(self.job.destination.name, mapped.keys, retry, mapped.loaded_at)
            self.report.already_delivered += len(known)
            todo = np.array([i for i, key in enumerate(mapped.keys) if key not in known], dtype=np.int64)
        self.route(mapped, self.preflight(mapped, todo), scope)

    def rejected_before(self, rejections: Sequence[Rejection]) -> dict[str, datetime | None]:
        """Which of these events the ledger holds as rejected already, and from which load of their
        row. One lookup on the ledger's index of rejections (a lookup of every status by key can
        scan the destination's whole ledger while its statistics are missing: a new ledger's first
        run took 0.14 s per chunk that way)."""
        if not rejections:
            return {}
        return self.job.ledger.rejected_loads(self.job.destination.name, [r.key for r in rejections])

    def reject(self, rejections: Sequence[Rejection], reasons: Sequence[str] | None = None,
               before: Mapping[str, datetime | None] | None = None) -> None:
        """Record rejections; count those the ledger already held as rejected (``before``, looked up
        when not given) separately.

        ``reasons`` groups them in the summary (default: each reason without its row id)."""
        if not rejections:
            return
        before = self.rejected_before(rejections) if before is None else before
        self.report.rejected_before += sum(1 for r in rejections if r.key in before)
        self.writer.rejected(list(rejections))
        self.report.reasons.update(reasons if reasons is not None else (generic_reason(r.reason) for r in rejections))

    def preflight(self, mapped: Mapped, todo: np.ndarray) -> np.ndarray:
        """Ask the destination about the chunk's billing customers (when it can answer): events of
        unknown ones are counted and named in the summary, and held rather than sent when the
        destination's ``unknown_customers`` setting says so. Returns the positions to send."""
        destination = self.job.destination
        if not destination.capabilities.customer_lookup or not len(todo):
            return todo
        directory: CustomerDirectory = self.job.sender  # type: ignore[assignment]  # declared capability
        customer_of = {p: destination.describe(mapped.payloads[p])[0] for p in todo.tolist()}
        unknown = {c for c in set(customer_of.values()) if c is not None and not directory.customer_exists(c)}
        if not unknown:
            return todo
        strays = [p for p, customer in customer_of.items() if customer in unknown]
        self.report.unknown_customers.update(customer_of[p] for p in strays)
        if destination.unknown_customers != "hold":
            log.warning("%s has no customer %s: %d events sent anyway (they bill nothing until the customer "
                        "exists)", destination.name, ", ".join(sorted(unknown)[:10]), len(strays))
            return todo
        held = [mapped.rejection(p, f"{mapped.tables[p]} row id={mapped.message_ids[p]}: customer {customer_of[p]!r} "
                                    f"does not exist in {destination.name}: held until it does", customer_of[p])
                for p in strays]
        self.report.held += len(held)
        self.writer.rejected(held, HELD)
        keep = set(todo.tolist()) - set(strays)
        return np.array([p for p in todo.tolist() if p in keep], dtype=np.int64)

    def route(self, mapped: Mapped, todo: np.ndarray, scope: Scope) -> None:
        """Live ingestion for recent events; events past the grace period are queued in the ledger
        for one backfill per UTC day (:func:`usage_billing.delivery.runs.send_queued`), or go into
        the scope's open backfill when it is that backfill's delivery."""
        if scope.into_backfill_id:
            self.send(mapped, todo.tolist(), Route("backfill", scope.into_backfill_id))
            self.report.sent_in_backfills += len(todo)
            return
        destination = self.job.destination
        cutoff = destination.backfill_cutoff(self.job.now())
        if cutoff is None:
            self.send(mapped, todo.tolist(), Route())
            return
        stamps = mapped.timestamps[todo]
        late = ~np.isnat(stamps) & (stamps < np.datetime64(cutoff.astimezone(UTC).replace(tzinfo=None), "us"))
        self.send(mapped, todo[~late].tolist(), Route())
        why = f"older than {destination.name}'s grace period: queued for the backfill of its UTC day"
        queued = [mapped.rejection(p, f"{mapped.tables[p]} row id={mapped.message_ids[p]}: {why}")
                  for p in todo[late].tolist()]
        if queued:
            self.writer.rejected(queued, QUEUED)
            self.report.queued += len(queued)

    def send(self, mapped: Mapped, positions: list[int], route: Route) -> None:
        """Send the events at ``positions`` of a mapped chunk; mark what the destination confirmed."""
        if positions:
            with self.report.timed("deliver"):
                _Batches(self, mapped, route).run(positions)

    def progress(self) -> None:
        """A progress line every ``job.progress_every`` seconds of a long task."""
        if self.job.clock() - self._last_progress < self.job.progress_every:
            return
        self._last_progress = self.job.clock()
        r = self.report
        log.info("progress: %s %s: %d events read, %d sent, %d accepted, %d rejected, %d already delivered",
                 r.destination, r.partition, r.unique_events, r.sent, r.accepted, r.rejected, r.already_delivered)


class _Batches:
    """The batches of one send: bounded in flight, collected as they finish, marked in the ledger."""

    def __init__(self, sending: Sending, mapped: Mapped, route: Route):
        self.sending, self.mapped, self.route = sending, mapped, route
        self.report = sending.report
        self.to_mark: list[int] = []
        self.unconfirmed: list[str] = []
        self.failure: BaseException | None = None
        self.position_of: dict[str, int] = {}

    def run(self, positions: list[int]) -> None:
        job, mapped = self.sending.job, self.mapped
        self.position_of = {mapped.keys[p]: p for p in positions}
        in_flight: list[_InFlight] = []
        size = job.destination.batch_size
        try:
            for start in range(0, len(positions), size):
                batch = positions[start:start + size]
                batch_keys = [mapped.keys[p] for p in batch]
                if self.failure is None:
                    # Bounded in-flight work keeps memory flat and lets a failure stop new sends quickly.
                    while len(in_flight) >= job.concurrency:
                        finished, _ = wait([p.future for p in in_flight], return_when=FIRST_COMPLETED)
                        for pending in [p for p in in_flight if p.future in finished]:
                            in_flight.remove(pending)
                            self.collect(pending)
                if self.failure is not None:
                    self.unconfirmed.extend(batch_keys)
                    continue
                self.report.batches += 1
                self.report.sent += len(batch)
                in_flight.append(_InFlight(batch_keys, self.sending.pool.submit(
                    send_resolving, job.sender, [mapped.payloads[p] for p in batch], batch_keys,
                    self.route.backfill_id)))
            for pending in in_flight:
                wait([pending.future])
                self.collect(pending)
        finally:
            self.sending.writer.delivered(mapped, self.to_mark, self.route)
        if self.failure is not None:
            self.report.notes.append(f"{len(self.unconfirmed)} events not confirmed: {self.failure}")
            raise DeliveryFailed(
                f"{job.destination.name}: {len(self.unconfirmed)} events of partition {self.report.partition} were "
                f"not confirmed ({self.failure}); {self.report.accepted} were delivered and marked. The next try "
                f"re-sends the rest with the same idempotency keys.") from self.failure

    def collect(self, done: _InFlight) -> None:
        try:
            outcome = done.future.result()
        except (TransientDeliveryError, FatalDeliveryError) as error:
            self.unconfirmed.extend(done.keys)
            self.failure = self.failure or error
            return
        except Exception as error:  # an unexpected bug must not lose the confirmed part of the chunk
            self.unconfirmed.extend(done.keys)
            self.failure = self.failure or error
            return
        report, mapped, position_of = self.report, self.mapped, self.position_of
        report.requests += outcome.requests
        report.retries += outcome.retries
        report.bisections += outcome.bisections
        report.accepted += len(outcome.accepted)
        self.to_mark.extend(position_of[k] for k in outcome.accepted if k in position_of)
        if outcome.rejected:
            name, describe = self.sending.job.destination.name, self.sending.job.destination.describe
            refused = [(k, message) for k, message in outcome.rejected.items() if k in position_of]
            rejections = [mapped.rejection(position_of[k], f"{name} rejected event {k}: {message}",
                                           describe(mapped.payloads[position_of[k]])[0]) for k, message in refused]
            report.destination_rejected += len(rejections)
            self.sending.reject(rejections, [f"{name}: {message}" for _, message in refused])
        if len(self.to_mark) >= MARK_EVERY:
            self.sending.writer.delivered(mapped, self.to_mark, self.route)
            self.to_mark = []
        self.sending.progress()
