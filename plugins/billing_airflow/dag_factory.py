"""Builds the delivery DAGs (hourly, replace, replay of rejections) and the sweep DAG from the configuration file."""

from __future__ import annotations

import logging
from datetime import timedelta

from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TriggerRule

from billing_airflow.alerts import alert_default_args, delivery_deadline
from billing_airflow.operators.approval import PreviewApprovalOperator
from billing_airflow.operators.deliver import (
    CompletenessSweepOperator,
    DeliveryReportOperator,
    PlanPartitionsOperator,
    QueuedBackfillOperator,
    SegmentDeliveryOperator,
    backfill_task_of,
)
from billing_airflow.operators.dry_run import DryRunOperator
from billing_airflow.operators.gate import LargeBackfillGateOperator
from billing_airflow.operators.reconcile import ReconcileOperator
from billing_airflow.operators.run_request import DELIVER, MODES, REPLACE, REPLAY_REJECTED, dag_id_for
from usage_billing.destinations import DESTINATIONS
from usage_billing.settings import ConfigError, load_settings

log = logging.getLogger(__name__)


#: Mapped deliver tasks are labelled by their partition in the UI: ``api_call``, ``api_call #2/4``
#: (bucket 1 of 4 counted from one), ``all event tables`` for the one task of a replace run.
PARTITION_LABEL = (
    "{% set p = task.partition or {} %}"
    "{% if p.get('table') == '*' %}all event tables"
    "{% else %}{{ p.get('table', '?') }}"
    "{% if p.get('buckets', 1) > 1 %} #{{ p.get('bucket', 0) + 1 }}/{{ p.get('buckets') }}{% endif %}"
    "{% endif %}"
)


def _params(mode: str) -> dict[str, Param]:
    """The run parameters of a mode's DAG. None for the hourly DAGs: their forms need nothing typed.

    A string param with no usable default is shown as required by the Airflow UI's forms and keeps the
    Trigger and Run Backfill buttons disabled, so an optional text is ``["null", "string"]`` with a null
    default. The replace period has no default on purpose: re-billing needs a period chosen by hand.
    """
    if mode == REPLACE:
        return {
            "period_start": Param(type="string", format="date-time", title="Period start (UTC)", description=(
                "First instant re-billed: every Orb event with a timestamp at or after it (and before the end), "
                "for all customers, is REPLACED by what this run sends.")),
            "period_end": Param(type="string", format="date-time", title="Period end (UTC, excluded)", description=(
                "End of the period, excluded; at most 31 days after the start, and not in the future.")),
        }
    if mode == REPLAY_REJECTED:
        return {
            "reason_contains": Param(None, type=["null", "string"], title="Reason contains (optional)", description=(
                "Replay only the rejections whose reason contains this text; empty replays every rejection.")),
        }
    return {}


def build_delivery_dag(destination: str, doc_md: str | None = None, mode: str = DELIVER) -> DAG | None:
    """A delivery DAG of one destination and one mode: plan -> deliver (one mapped task per partition) -> report.

    The replace DAG starts with preview -> approve (``airflow.approve_replace``, on by default): the run
    waits in the UI's Required Actions with the dry run's impact, and Reject skips everything after it.
    The hourly DAG starts with a gate (``airflow.approve_backfills_above``, None: no gate) that holds a
    backfill run for approval the same way when it would send more events than that.

    ``mode=deliver`` is the hourly ``segment_to_<destination>``; ``replace`` (destinations declaring backfills: Orb) and
    ``replay_rejected`` are manually triggered DAGs of their own (``segment_to_orb_replace``,
    ``segment_to_<destination>_replay_rejected``). The mode is given to the operators here, never
    read from the run's parameters, so no form or backfill can turn a replace into a plain delivery.

    Reads only the local configuration file at parse time (no database or network access). Returns
    None, with a warning, when the destination is not configured, so an Orb-only setup shows no
    Kable DAG. An invalid configuration raises, which Airflow shows as an import error naming the
    setting.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == REPLACE and not DESTINATIONS[destination].capabilities.backfills:
        raise ValueError(f"mode=replace needs backfills to replace a period; {destination} declares none")
    settings = load_settings()
    dag_id = dag_id_for(destination, mode)
    if getattr(settings.destinations, destination) is None:
        log.warning("destinations.%s is not configured: no %s DAG", destination, dag_id)
        return None
    options = settings.airflow
    if mode == DELIVER:
        try:
            # A plain cron string is a zero-length trigger in Airflow 3; the window needs an interval.
            schedule = CronDataIntervalTimetable(options.schedule, timezone="UTC")
        except Exception as error:  # croniter's messages do not name our setting
            raise ConfigError(f"airflow.schedule: {options.schedule!r} is not a cron expression ({error})") from None
    else:
        schedule = None  # triggered by hand only; a backfill of it cannot exist

    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        start_date=options.start_date,
        catchup=False,
        max_active_runs=1,
        doc_md=doc_md,
        tags=["usage-billing", "segment", destination, *([mode] if mode != DELIVER else [])],
        params=_params(mode),
        default_args={
            "retries": options.retries,
            "retry_delay": options.retry_delay,
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(minutes=30),
            **alert_default_args(settings),
        },
        deadline=delivery_deadline(settings) if mode == DELIVER else None,
    ) as dag:
        plan = PlanPartitionsOperator(task_id="plan", destination=destination, mode=mode)
        if mode == REPLACE and options.approve_replace:
            # Retries would re-ask nobody anything: the preview is read-only and the approval is a person's.
            preview = DryRunOperator(task_id="preview", destination=destination, mode=REPLACE, run_window=True,
                                     retries=0)
            approve = PreviewApprovalOperator(task_id="approve", preview_task_id="preview", retries=0)
            preview >> approve >> plan
        if mode == DELIVER and options.approve_backfills_above is not None:
            gate = LargeBackfillGateOperator(task_id="gate", destination=destination, approve_task_id="approve",
                                             continue_task_id="plan", retries=0)
            approve = PreviewApprovalOperator(task_id="approve", preview_task_id="gate", retries=0)
            # plan runs after an Approve, or straight after the gate when the approval was branched away.
            plan.trigger_rule = TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS
            gate >> [approve, plan]
            approve >> plan
        deliver = SegmentDeliveryOperator.partial(
            task_id="deliver",
            destination=destination,
            mode=mode,
            map_index_template=PARTITION_LABEL,
            max_active_tis_per_dag=options.max_active_tis_per_dag,
            **({"pool": options.pool} if options.pool else {}),
        ).expand(partition=plan.output)
        backfill = None
        if backfill_task_of(DESTINATIONS[destination].capabilities, mode):
            # After every partition, whatever became of it: what the others queued is sent.
            backfill = QueuedBackfillOperator(task_id="backfill", destination=destination, mode=mode,
                                              trigger_rule=TriggerRule.ALL_DONE)
        report = DeliveryReportOperator(task_id="report", destination=destination, deliver_task_id="deliver",
                                        plan_task_id="plan", backfill_task_id=backfill and backfill.task_id,
                                        trigger_rule=TriggerRule.ALL_DONE, mode=mode)
        if backfill is None:
            plan >> deliver >> report
        else:
            plan >> deliver >> backfill >> report
    return dag


def build_sweep_dag(doc_md: str | None = None) -> DAG:
    """``usage_billing_sweep``: daily, one task per configured destination."""
    settings = load_settings()
    try:
        schedule = CronDataIntervalTimetable(settings.sweep.schedule, timezone="UTC")
    except Exception as error:
        raise ConfigError(f"sweep.schedule: {settings.sweep.schedule!r} is not a cron expression ({error})") from None
    with DAG(
        dag_id="usage_billing_sweep",
        schedule=schedule,
        start_date=settings.airflow.start_date,
        catchup=False,
        max_active_runs=1,
        doc_md=doc_md,
        tags=["usage-billing", "segment", "sweep"],
        default_args={"retries": settings.airflow.retries, "retry_delay": settings.airflow.retry_delay,
                      "retry_exponential_backoff": True, **alert_default_args(settings)},
    ) as dag:
        for destination in settings.configured_destinations():
            sweep = CompletenessSweepOperator(task_id=f"sweep_{destination}", destination=destination,
                                              **({"pool": settings.airflow.pool} if settings.airflow.pool else {}))
            # After the sweep, whatever it did: the comparison is worth logging even when it failed.
            sweep >> ReconcileOperator(task_id=f"reconcile_{destination}", destination=destination,
                                       trigger_rule=TriggerRule.ALL_DONE)
    return dag


def build_reconcile_dag(doc_md: str | None = None) -> DAG:
    """``usage_billing_reconcile``: triggered by hand for any range and destination (params)."""
    settings = load_settings()
    configured = settings.configured_destinations()
    with DAG(
        dag_id="usage_billing_reconcile",
        schedule=None,
        start_date=settings.airflow.start_date,
        catchup=False,
        doc_md=doc_md,
        tags=["usage-billing", "segment", "reconcile"],
        params={
            "destination": Param(configured[0], enum=configured, description="the destination to reconcile"),
            "start": Param(None, type=["null", "string"], description="range start, UTC ISO 8601 (required)"),
            "end": Param(None, type=["null", "string"], description="range end, exclusive, UTC ISO 8601 (required)"),
        },
        default_args={"retries": settings.airflow.retries, "retry_delay": settings.airflow.retry_delay,
                      **alert_default_args(settings)},
    ) as dag:
        ReconcileOperator(task_id="reconcile", destination="{{ params.destination }}", start="{{ params.start }}",
                          end="{{ params.end }}", required_range=True)
    return dag
