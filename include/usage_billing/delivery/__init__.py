"""The one delivery core every destination and every warehouse shares.

One job per module:

* :mod:`~usage_billing.delivery.contract`: the transport contract hooks implement (the only module
  hooks import): ``Sender``, ``BackfillApi``, ``BatchOutcome`` and the errors;
* :mod:`~usage_billing.delivery.job`: :class:`DeliveryJob`, built once per task, and :class:`Scope`;
* :mod:`~usage_billing.delivery.runs`: the entry points (deliver a window, replay, replace, send the
  events queued for backfills);
* :mod:`~usage_billing.delivery.sending`: batches, bisection, key de-duplication, backfill routing;
* :mod:`~usage_billing.delivery.pipeline`: read-ahead threads and the ledger writer;
* :mod:`~usage_billing.delivery.backfills`: Orb-style backfill sessions and their day locks;
* :mod:`~usage_billing.delivery.sweep`: the daily completeness sweep;
* :mod:`~usage_billing.delivery.report`: what a task did, and its log summary;
* :mod:`~usage_billing.delivery.fake`: an in-process ``Sender`` for tests and demos.
"""

from __future__ import annotations

from usage_billing.delivery.contract import (
    BackfillApi,
    BatchOutcome,
    BatchRejected,
    DeliveryFailed,
    FatalDeliveryError,
    Sender,
    TransientDeliveryError,
)
from usage_billing.delivery.job import DeliveryJob, Scope
from usage_billing.delivery.report import DeliveryReport
from usage_billing.delivery.runs import deliver, deliver_window, replace_window, replay_rejected, send_queued
from usage_billing.delivery.sweep import SweepReport, sweep

__all__ = ["BackfillApi", "BatchOutcome", "BatchRejected", "DeliveryFailed", "DeliveryJob", "DeliveryReport",
           "FatalDeliveryError", "Scope", "Sender", "SweepReport", "TransientDeliveryError", "deliver",
           "deliver_window", "replace_window", "replay_rejected", "send_queued", "sweep"]
