"""The approval gate: a run that would change billing irreversibly, or a lot of it, waits for a person.

A replace re-bills a whole period for all customers (Orb drops what it held once the replacing backfill
closes), and a large backfill can add a month of invoices at once; neither can be taken back. So such a
run first previews itself (:class:`~billing_airflow.operators.dry_run.DryRunOperator`, nothing sent or
written), then waits in Airflow's Required Actions page with that preview as the request's text. Approve
lets the run continue; Reject skips every later task, so nothing is sent and nothing is written.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

#: Rows of the per-day x customer x event table and of the hourly change shown in the request.
MAX_ROWS = 20


def approval_subject(preview: dict) -> str:
    """One line naming what is asked: the mode, the destination and the period."""
    what = "Re-bill (REPLACE)" if preview.get("mode") == "replace" else "Deliver"
    return (f"{what} {preview.get('destination', '?')} for [{preview.get('start', '?')}, {preview.get('end', '?')}): "
            f"{preview.get('would_send', 0)} events")


def approval_body(preview: dict) -> str:
    """The dry run's impact as Markdown: what would be sent, through backfills, and what Orb holds now vs after."""
    replace = preview.get("mode") == "replace"
    lines = [
        f"**Dry run of this run** ({preview.get('mode')}, {preview.get('destination')}, "
        f"`{preview.get('start')}` to `{preview.get('end')}`, end excluded): nothing has been sent yet.",
        "",
        f"- events that would be sent: **{preview.get('would_send', 0)}**",
        f"- through backfills: **{preview.get('in_backfills', 0)}** events "
        f"in {preview.get('backfills', 0)} backfill(s)",
        f"- already delivered (skipped): {preview.get('already_delivered', 0)}",
        f"- would be rejected: {preview.get('would_reject', 0)}",
    ]
    if replace:
        lines += ["", "Approving **replaces everything the destination holds for this period, for all customers**, "
                      "with the events above once the backfill closes. Reject ends the run with nothing sent."]
    changes = preview.get("replace_change") or []
    if replace:
        lines += ["", "**Hourly change against what the destination holds now**"]
        if changes:
            lines += ["", "| hour (UTC) | now | after | change |", "|---|---:|---:|---:|"]
            lines += [f"| {hour} | {now} | {after} | {after - now:+d} |" for hour, now, after in changes[:MAX_ROWS]]
            if len(changes) > MAX_ROWS:
                lines.append(f"| ... {len(changes) - MAX_ROWS} more hours | | | |")
        else:
            lines.append("no hour changes: the destination already holds exactly these counts")
    rows = preview.get("by_day_customer_event") or []
    if rows:
        lines += ["", "**Would send, per day x customer x event**", "",
                  "| day | customer | event | events |", "|---|---|---|---:|"]
        lines += [f"| {day} | {customer or '-'} | {event or '-'} | {count} |"
                  for day, customer, event, count in rows[:MAX_ROWS]]
        if len(rows) > MAX_ROWS:
            lines.append(f"| ... {len(rows) - MAX_ROWS} more rows | | | |")
    return "\n".join(lines)


class PreviewApprovalOperator(ApprovalOperator):
    """Ask for approval with the preview task's XCom (a dry-run report) as subject and body.

    Reject skips every task after this one (``ignore_downstream_trigger_rules``), the report's
    ``all_done`` included: the run ends with nothing sent and nothing written.
    """

    def __init__(self, *, preview_task_id: str, **kwargs: Any):
        kwargs.setdefault("subject", "Approve this billing run")
        super().__init__(ignore_downstream_trigger_rules=True, **kwargs)
        self.preview_task_id = preview_task_id

    def execute(self, context: Any) -> Any:
        preview = context["ti"].xcom_pull(task_ids=self.preview_task_id) or {}
        self.subject = approval_subject(preview)
        self.body = approval_body(preview)
        self.log.info("waiting for approval in Required Actions: %s", self.subject)
        return super().execute(context)


def needs_approval(run_type: str, would_send: int | None, threshold: int | None) -> bool:
    """A backfill run that would send more than ``airflow.approve_backfills_above`` events waits for a person.

    Scheduled and manual runs deliver one hour and are never held: an hour late is worse than a
    large hour. ``would_send`` is None when no preview was made (not a backfill, or no threshold)."""
    return run_type == "backfill" and threshold is not None and would_send is not None and would_send > threshold
