"""The dry-run task: previews a delivery or a replace of any range, sending and writing nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from billing_airflow.operators.deliver import _ConfiguredOperator, open_hook, open_warehouse
from billing_airflow.operators.run_request import DELIVER, REPLACE, run_request
from usage_billing.destinations import get_destination
from usage_billing.ledger import RunRef
from usage_billing.settings import Settings
from usage_billing.sources import Window


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class DryRunOperator(_ConfiguredOperator):
    """Log what delivering (``mode=deliver``) or replacing (``mode=replace``) ``[start, end)`` would do.

    A delivery's range is on the loaded-at column, as an hourly run's window; a replace's on the
    event timestamp, as a replace run's. Nothing is sent and nothing is written to the ledger; the
    destination is only asked what it holds (customers, and hourly counts for a replace).

    With ``run_window=True`` (no start/end) the range is the run's own, validated exactly as the
    run's plan validates it: the hourly window for ``deliver``, the ``period_start``/``period_end``
    params for ``replace``. That is the preview an approval gate shows before the real run sends."""

    template_fields = ("destination", "start", "end", "mode")

    def __init__(self, *, start: str | None = None, end: str | None = None, mode: str = "deliver",
                 run_window: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.start, self.end, self.mode, self.run_window = start, end, mode, run_window

    def _window(self, context: Any, settings: Settings) -> Window:
        if self.run_window:
            request = run_request(context, settings, REPLACE if self.mode == "replace" else DELIVER, self.destination)
            self.log.info("%s", request.echo)
            return request.window
        if not self.start or not self.end or "None" in (self.start, self.end):
            raise ValueError("dry run: give both params start and end (UTC, ISO 8601, e.g. 2026-11-01T00:00:00Z)")
        window = Window(_utc(self.start), _utc(self.end))
        if window.end <= window.start:
            raise ValueError(f"dry run: end {window.end.isoformat()} is not after start {window.start.isoformat()}")
        return window

    def execute(self, context: Any) -> dict:
        # Imported here, not when a DAG file is parsed (see billing_airflow.operators.deliver).
        from usage_billing.delivery import DeliveryJob
        from usage_billing.delivery.dry_run import dry_run

        if self.mode not in ("deliver", "replace"):
            raise ValueError(f"param mode: {self.mode!r} is not deliver or replace")
        settings = self.settings()
        window = self._window(context, settings)
        self.log.info("dry run requested: destination=%s mode=%s range [%s, %s): nothing will be sent or written",
                      self.destination, self.mode, window.start.isoformat(), window.end.isoformat())
        destination = get_destination(self.destination, settings)
        run = RunRef(dag_id=context["dag"].dag_id, run_id=context["run_id"])
        hook = open_hook(destination, settings)
        with open_warehouse(settings) as (source, ledger), hook:
            job = DeliveryJob.from_settings(settings, destination, source, ledger, hook, run)
            report = dry_run(job, settings.source.events, window, replace=self.mode == "replace")
        self.log.info("%s", report.render())
        return report.to_dict()
