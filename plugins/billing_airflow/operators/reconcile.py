"""The reconciliation task: wires ``usage_billing.reconcile`` to Airflow and fails loudly on a difference.

Daily, ``reconcile_<destination>`` follows ``sweep_<destination>`` over the same horizon
(``sweep.horizon`` ending at the run's data interval end); on demand, the ``usage_billing_reconcile``
DAG runs the same operator for the ``start`` / ``end`` it is given.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from billing_airflow.operators.deliver import _ConfiguredOperator, open_hook, open_warehouse
from usage_billing.destinations import get_destination
from usage_billing.ledger import RunRef


class ReconcileOperator(_ConfiguredOperator):
    """Compare warehouse, ledger and destination per hour, heal what the destination lost, log the
    table, and fail if a difference remains.

    ``start``/``end`` (ISO 8601, templated) choose the range; without them it is the sweep's horizon
    ending at the whole hour before the run's data interval end (the hour still being delivered is
    left to tomorrow)."""

    template_fields = ("destination", "start", "end")

    def __init__(self, *, start: str | None = None, end: str | None = None, required_range: bool = False,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.start = start
        self.end = end
        self.required_range = required_range

    def loaded_before(self, context: Any) -> datetime:
        """Rows loaded from this moment on are the hourly runs' next job, not a difference: the end of
        the sweep's scan in the daily DAG, the start of the current hour on demand."""
        from usage_billing.reconcile.compare import hour_of

        end = context.get("data_interval_end")
        if self.start or end is None:
            return hour_of(datetime.now(UTC))
        return datetime.fromtimestamp(end.timestamp(), UTC)

    def range(self, context: Any, horizon) -> tuple[datetime, datetime]:
        from usage_billing.reconcile.compare import hour_of

        given = [value for value in (self.start, self.end) if value and value != "None"]
        if len(given) == 2:
            start, end = _utc(given[0]), _utc(given[1])
        elif given or self.required_range:
            raise ValueError("reconcile: give both params start and end (UTC, ISO 8601, e.g. 2026-11-01T00:00:00Z)")
        else:
            end = hour_of(datetime.fromtimestamp(context["data_interval_end"].timestamp(), UTC))
            start = end - horizon
        if end <= start:
            raise ValueError(f"reconcile: end {end.isoformat()} is not after start {start.isoformat()}")
        return start, end

    def execute(self, context: Any) -> dict:
        # Imported here, not when a DAG file is parsed (see billing_airflow.operators.deliver).
        from usage_billing.delivery import DeliveryJob
        from usage_billing.reconcile import Checking, reconcile

        settings = self.settings()
        destination = get_destination(self.destination, settings)
        start, end = self.range(context, settings.sweep.horizon)
        run = RunRef(dag_id=context["dag"].dag_id, run_id=context["run_id"])
        options = settings.reconcile
        hook = open_hook(destination, settings)
        with open_warehouse(settings) as (source, ledger), hook:
            ledger.create()
            job = DeliveryJob.from_settings(settings, destination, source, ledger, hook, run)
            report = reconcile(job, settings.source.events, start, end,
                               Checking(options.sample_hours, options.compare_volume,
                                        loaded_before=self.loaded_before(context)))
        self.log.info("%s", report.render())
        unresolved = report.unresolved()
        if unresolved:
            shown = "\n  ".join(unresolved[:20]) + (f"\n  ... and {len(unresolved) - 20} more"
                                                    if len(unresolved) > 20 else "")
            raise RuntimeError(f"reconciliation of {self.destination}: {len(unresolved)} differences remain after "
                               f"healing (table above; findings in {ledger.schema}.findings):\n  {shown}")
        return report.to_dict()


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
