"""Builds ``usage_billing_dry_run``: a preview of any range, triggered by hand with params."""

from __future__ import annotations

from airflow.sdk import DAG, Param

from billing_airflow.alerts import alert_default_args
from billing_airflow.operators.dry_run import DryRunOperator
from usage_billing.settings import load_settings


def build_dry_run_dag(doc_md: str | None = None) -> DAG:
    """One task that logs the preview; params say what to preview (nothing typed is needed but the range)."""
    settings = load_settings()
    configured = settings.configured_destinations()
    with DAG(
        dag_id="usage_billing_dry_run",
        schedule=None,
        start_date=settings.airflow.start_date,
        catchup=False,
        doc_md=doc_md,
        tags=["usage-billing", "segment", "dry-run"],
        params={
            "destination": Param(configured[0], enum=configured, description="the destination to preview"),
            "mode": Param("deliver", enum=["deliver", "replace"], description=(
                "deliver: the range on the loaded-at column, as a run or backfill would. replace: re-bill the "
                "range by event timestamp, as the replace DAG would.")),
            "start": Param(None, type=["null", "string"], description="range start, UTC ISO 8601 (required)"),
            "end": Param(None, type=["null", "string"], description="range end, exclusive, UTC ISO 8601 (required)"),
        },
        default_args={"retries": 0, **alert_default_args(settings)},
    ) as dag:
        DryRunOperator(task_id="preview", destination="{{ params.destination }}", mode="{{ params.mode }}",
                       start="{{ params.start }}", end="{{ params.end }}")
    return dag
