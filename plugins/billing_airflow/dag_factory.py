"""Builds the hourly delivery DAG of one destination from the configuration file."""

from __future__ import annotations

import logging
from datetime import timedelta

from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TriggerRule

from billing_airflow.operators.deliver import (
    MODES,
    CompletenessSweepOperator,
    DeliveryReportOperator,
    PlanPartitionsOperator,
    SegmentDeliveryOperator,
)
from billing_airflow.operators.reconcile import ReconcileOperator
from usage_billing.settings import ConfigError, load_settings

log = logging.getLogger(__name__)


def build_delivery_dag(destination: str, doc_md: str | None = None) -> DAG | None:
    """The ``segment_to_<destination>`` DAG: plan -> deliver (one mapped task per partition) -> report.

    Reads only the local configuration file at parse time (no database or network access). Returns
    None, with a warning, when the destination is not configured, so an Orb-only setup shows no
    Kable DAG. An invalid configuration raises, which Airflow shows as an import error naming the
    setting.
    """
    settings = load_settings()
    if getattr(settings.destinations, destination) is None:
        log.warning("destinations.%s is not configured: no segment_to_%s DAG", destination, destination)
        return None
    options = settings.airflow
    try:
        schedule = CronDataIntervalTimetable(options.schedule, timezone="UTC")
    except Exception as error:  # croniter's messages do not name our setting
        raise ConfigError(f"airflow.schedule: {options.schedule!r} is not a cron expression ({error})") from None

    with DAG(
        dag_id=f"segment_to_{destination}",
        # A plain cron string is a zero-length trigger in Airflow 3; the window needs an interval.
        schedule=schedule,
        start_date=options.start_date,
        catchup=False,
        max_active_runs=1,
        doc_md=doc_md,
        tags=["usage-billing", "segment", destination],
        params={
            "mode": Param("deliver", enum=list(MODES), description=(
                "deliver: the run's window (default). replay_rejected: re-send the events the ledger "
                "holds as rejected, mapped with the current settings, with their original idempotency keys. "
                "replace (Orb only): re-send every event with a timestamp in the window inside an Orb "
                "backfill that REPLACES what Orb holds for that period (re-billing after a mapping change).")),
            "reason_contains": Param("", type="string", description=(
                "replay_rejected only: replay just the rejections whose reason contains this text.")),
        },
        default_args={
            "retries": options.retries,
            "retry_delay": options.retry_delay,
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(minutes=30),
        },
    ) as dag:
        plan = PlanPartitionsOperator(task_id="plan", destination=destination)
        deliver = SegmentDeliveryOperator.partial(
            task_id="deliver",
            destination=destination,
            max_active_tis_per_dag=options.max_active_tis_per_dag,
            **({"pool": options.pool} if options.pool else {}),
        ).expand(partition=plan.output)
        report = DeliveryReportOperator(task_id="report", destination=destination, deliver_task_id="deliver",
                                        plan_task_id="plan", trigger_rule=TriggerRule.ALL_DONE)
        plan >> deliver >> report
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
                      "retry_exponential_backoff": True},
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
        default_args={"retries": settings.airflow.retries, "retry_delay": settings.airflow.retry_delay},
    ) as dag:
        ReconcileOperator(task_id="reconcile", destination="{{ params.destination }}", start="{{ params.start }}",
                          end="{{ params.end }}", required_range=True)
    return dag
