"""Reconciliation: prove the destination holds exactly what the ledger says it delivered, and heal it.

Per UTC hour of event time, three counts side by side: the warehouse's deliverable events (mapped
with the destination's mapping, as a delivery would), the ledger's delivered events, and the
destination's own count (Orb's ``GET /v1/events/volume``). Matching totals are no proof (two
different sets can have the same size), so every hour that disagrees, and a sample of those that
agree, is checked key by key (Orb's ``POST /v1/events/search``).

* :mod:`~usage_billing.reconcile.compare`: the pure part (per-hour lines, which hours to check,
  what a difference means, the report), tested without a database or a server;
* :mod:`~usage_billing.reconcile.run`: the I/O (warehouse, ledger, destination) and the healing,
  which goes through the delivery core so a re-sent event keeps its idempotency key;
* :mod:`~usage_billing.reconcile.fake`: an in-process destination with a read API, for tests.
"""

from __future__ import annotations

from usage_billing.reconcile.compare import HourLine, ReconcileReport, choose_hours, hours_between
from usage_billing.reconcile.run import Checking, EventReader, reconcile

__all__ = ["Checking", "EventReader", "HourLine", "ReconcileReport", "choose_hours", "hours_between", "reconcile"]
