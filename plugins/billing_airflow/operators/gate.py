"""The large-backfill gate of the hourly DAGs: preview a backfill run, and ask for approval when it is large.

Every hourly DAG starts with this one task. For a scheduled or manual run it only branches on to
``plan`` (no preview: an ordinary hour is never held). For a run of a backfill it previews the run's
window through the real core (nothing sent, nothing written) and, when the preview would send more
than ``airflow.approve_backfills_above`` events, branches to ``approve`` instead; the approval shows the
preview (:mod:`billing_airflow.operators.approval`). The threshold is read when the run runs, so
changing it needs no DAG re-parse.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.bases.branch import BranchMixIn

from billing_airflow.operators.approval import needs_approval
from billing_airflow.operators.deliver import open_warehouse
from billing_airflow.operators.dry_run import DryRunOperator


class LargeBackfillGateOperator(DryRunOperator, BranchMixIn):
    """Branch to ``approve_task_id`` for a backfill run above the threshold, else to ``continue_task_id``.

    Its XCom is the run's preview (a dry-run report), or ``{"previewed": False, ...}`` for a run that
    needs none."""

    inherits_from_skipmixin = True

    def __init__(self, *, approve_task_id: str, continue_task_id: str, **kwargs: Any):
        super().__init__(mode="deliver", run_window=True, **kwargs)
        self.approve_task_id = approve_task_id
        self.continue_task_id = continue_task_id

    def execute(self, context: Any) -> dict:
        threshold = self.settings().airflow.approve_backfills_above
        run_type = getattr(context.get("dag_run"), "run_type", None) or ""
        # The task SDK's DagRunType prints as "DagRunType.BACKFILL": compare its value, never str() of it.
        run_type = str(getattr(run_type, "value", run_type))
        if run_type != "backfill" or threshold is None:
            self.log.info("gate: a %s run is never held for approval; on to %s", run_type or "?",
                          self.continue_task_id)
            self.do_branch(context, self.continue_task_id)
            return {"previewed": False, "run_type": run_type}
        # The first run of a new install previews before plan has created the ledger's tables (as plan does).
        with open_warehouse(self.settings()) as (_, ledger):
            ledger.create()
        preview = super().execute(context)
        held = needs_approval(run_type, preview["would_send"], threshold)
        self.log.info("gate: this backfill run would send %d events; airflow.approve_backfills_above is %d: %s",
                      preview["would_send"], threshold, "WAITING FOR APPROVAL" if held else "no approval needed")
        self.do_branch(context, self.approve_task_id if held else self.continue_task_id)
        return preview
