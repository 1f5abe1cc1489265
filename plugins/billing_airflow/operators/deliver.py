"""Operators that wire the delivery core to Airflow: context -> window, connections -> engines and hooks.

Like the HTTP provider's ``HttpOperator``, these only gather arguments and wire the hook; the work
is in ``usage_billing.delivery`` (pure core) and the destination hooks (transport).

* :class:`PlanPartitionsOperator` validates the configuration, counts the window's rows per event
  table and returns the partitions to deliver (a small list, the only data passed through XCom);
* :class:`SegmentDeliveryOperator` delivers one partition to one destination and logs its summary;
* :class:`DeliveryReportOperator` adds the partitions' summaries up and fails the run if any failed.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from billing_airflow.hooks.base import BillingApiHook
from billing_airflow.hooks.kable import KableHook
from billing_airflow.hooks.orb import OrbHook
from billing_airflow.operators.run_request import DELIVER, MODES, REPLACE, REPLAY_REJECTED, run_request
from usage_billing.delivery import deliver_partition, replace_window, replay_rejected
from usage_billing.destinations import get_destination
from usage_billing.ledger import Ledger, RunRef
from usage_billing.settings import Settings, load_settings
from usage_billing.sweep import sweep
from usage_billing.warehouse import Partition, Window, count_window, create_engine, table_columns

HOOKS: dict[str, type[BillingApiHook]] = {"orb": OrbHook, "kable": KableHook}


def sqlalchemy_url(conn_id: str) -> sa.URL:
    """A SQLAlchemy URL for an Airflow connection (PostgreSQL, Redshift-compatible, or SQLite).

    SQLite connections name the database file in ``host`` (``{"conn_type": "sqlite", "host": "/path/wh.db"}``).
    """
    conn = BaseHook.get_connection(conn_id)
    conn_type = (conn.conn_type or "").lower()
    if conn_type in ("postgres", "postgresql"):
        return sa.URL.create("postgresql+psycopg2", username=conn.login or None, password=conn.password or None,
                             host=conn.host or None, port=conn.port or None, database=conn.schema or None)
    if conn_type == "sqlite":
        return sa.URL.create("sqlite", database=conn.host or conn.schema)
    raise ValueError(f"connection {conn_id!r}: conn_type {conn.conn_type!r} is not supported "
                     f"(use postgres, or sqlite for the embedded warehouse)")


ALL_TABLES = "*"


class _ConfiguredOperator(BaseOperator):
    """``mode`` is the DAG's, fixed when the DAG is built (see run_request): never a run parameter."""

    def __init__(self, *, destination: str, config_path: str | None = None, mode: str = DELIVER, **kwargs: Any):
        super().__init__(**kwargs)
        self.destination = destination
        self.config_path = config_path
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode

    def settings(self) -> Settings:
        return load_settings(self.config_path)

    def engines(self, settings: Settings) -> tuple[sa.Engine, sa.Engine]:
        """Warehouse and ledger engines; one engine when both live in the same connection."""
        schemas = [settings.source.schema_, settings.ledger.schema_]
        warehouse = create_engine(sqlalchemy_url(settings.source.conn_id), schemas)
        if settings.ledger.conn_id == settings.source.conn_id:
            return warehouse, warehouse
        return warehouse, create_engine(sqlalchemy_url(settings.ledger.conn_id), [settings.ledger.schema_])


class PlanPartitionsOperator(_ConfiguredOperator):
    """Validate the configuration and list the window's partitions (event table x hash bucket)."""

    def execute(self, context: Any) -> list[dict]:
        settings = self.settings()
        get_destination(self.destination, settings)  # fail here, once, on a missing destination section
        request = run_request(context, settings, self.mode, self.destination)
        self.log.info("%s", request.echo)
        mode, reason_contains, window = request.mode, request.reason_contains, request.window
        warehouse, ledger_engine = self.engines(settings)
        ledger = Ledger(ledger_engine, settings.ledger.schema_)
        ledger.create()
        source = settings.source
        if mode == REPLAY_REJECTED:
            tables = ledger.rejected_tables(self.destination, reason_contains)
            self.log.info("plan: replay of rejected %s events%s in tables %s", self.destination,
                          f" whose reason contains {reason_contains!r}" if reason_contains else "", tables)
            warehouse.dispose()
            ledger_engine.dispose()
            return [Partition(table).to_dict() for table in tables]
        if mode == REPLACE:
            self.log.warning("plan: REPLACE MODE for %s: one task re-sends every event with a timestamp in "
                             "[%s, %s) inside one replacing Orb backfill", self.destination,
                             window.start.isoformat(), window.end.isoformat())
            warehouse.dispose()
            ledger_engine.dispose()
            return [Partition(ALL_TABLES).to_dict()]
        partitions, lines = [], []
        with warehouse.connect() as conn:
            for table in source.events:
                if table_columns(conn, source.schema_, table) is None:
                    lines.append(f"  {source.schema_}.{table:<24} missing (no event of this type loaded yet)")
                    continue
                rows = count_window(conn, source.schema_, table, window, source.loaded_at_column)
                lines.append(f"  {source.schema_}.{table:<24} {rows} rows")
                buckets = settings.airflow.partitions_per_table
                partitions += [Partition(table, bucket, buckets).to_dict() for bucket in range(buckets)]
        warehouse.dispose()
        ledger_engine.dispose()
        self.log.info("plan: destination=%s window %s on %s\n%s\n  -> %d partitions",
                      self.destination, window, source.loaded_at_column, "\n".join(lines), len(partitions))
        return partitions


class SegmentDeliveryOperator(_ConfiguredOperator):
    """Deliver one partition of the run's window to one destination (Orb or Kable)."""

    template_fields = ("partition",)

    def __init__(self, *, partition: dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.partition = partition

    def execute(self, context: Any) -> dict:
        settings = self.settings()
        destination = get_destination(self.destination, settings)
        request = run_request(context, settings, self.mode, self.destination)
        self.log.info("%s", request.echo)
        mode, reason_contains, window = request.mode, request.reason_contains, request.window
        partition = Partition.from_dict(self.partition or {"table": settings.source.events[0]})
        run = RunRef(dag_id=context["dag"].dag_id, run_id=context["run_id"])
        warehouse, ledger_engine = self.engines(settings)
        ledger = Ledger(ledger_engine, settings.ledger.schema_)
        hook = HOOKS[self.destination](destination.settings.conn_id, destination.settings,
                                       rate_limit_storage=settings.airflow.rate_limit_storage)
        common = dict(engine=warehouse, schema=settings.source.schema_,
                      loaded_at_column=settings.source.loaded_at_column, chunk_size=settings.source.chunk_size,
                      destination=destination, sender=hook, ledger=ledger, run=run,
                      concurrency=destination.settings.concurrency)
        try:
            with hook:
                if mode == REPLAY_REJECTED:
                    report = replay_rejected(table=partition.table, reason_contains=reason_contains, **common)
                elif mode == REPLACE:
                    report = replace_window(tables=settings.source.events,
                                            window=window, **{k: v for k, v in common.items()
                                                              if k != "loaded_at_column"})
                else:
                    report = deliver_partition(partition=partition, window=window, **common)
        except Exception:
            self.log.error("delivery failed: destination=%s partition=%s window %s", self.destination,
                           partition, window)
            raise
        finally:
            warehouse.dispose()
            ledger_engine.dispose()
        self.log.info("%s", report.render())
        if report.lateness_seconds and max(report.lateness_seconds) > settings.source.lookback.total_seconds():
            self.log.warning("some rows were loaded more than source.lookback (%s) after their event time; "
                             "raise source.lookback or rely on the completeness sweep", settings.source.lookback)
        return report.to_dict()


class DeliveryReportOperator(_ConfiguredOperator):
    """Add up the partitions' summaries; fail the run if a partition did not finish."""

    def __init__(self, *, deliver_task_id: str, plan_task_id: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.deliver_task_id = deliver_task_id
        self.plan_task_id = plan_task_id

    def execute(self, context: Any) -> dict:
        ti = context["ti"]
        planned = ti.xcom_pull(task_ids=self.plan_task_id)
        if planned is None:
            # An empty list is a legitimate plan; no list at all means plan failed, and a success
            # here would mark the run successful with its window never delivered.
            # Failed without retries: a retry cannot change the outcome, it only holds the DAG's run slot.
            raise AirflowFailException("plan did not finish: no partition list; see the plan task log and clear "
                                       "the run")
        pulled = ti.xcom_pull(task_ids=self.deliver_task_id)
        # One mapped instance comes back as its value, several as a sequence.
        reports = [r for r in ([pulled] if isinstance(pulled, dict) else list(pulled or [])) if r]
        total: Counter = Counter()
        reasons: Counter = Counter()
        keys = ("rows_read", "duplicates_dropped", "unique_events", "already_delivered",
                "sent", "accepted", "mapping_rejected", "destination_rejected", "retries", "bisections")
        lines = [f"{'partition':<28}" + "".join(f"{k.split('_')[0][:9]:>10}" for k in keys)]
        for report in reports:
            total.update({k: report.get(k, 0) for k in keys})
            reasons.update({reason: count for reason, count in report.get("top_reasons", [])})
            lines.append(f"{report['partition']:<28}" + "".join(f"{report.get(k, 0):>10}" for k in keys))
        lines.append(f"{'TOTAL':<28}" + "".join(f"{total[k]:>10}" for k in keys))
        self.log.info("run report: destination=%s, %d of %d partitions reported\n%s%s", self.destination,
                      len(reports), len(planned), "\n".join(lines),
                      "".join(f"\n  {count:>8} x {reason}" for reason, count in reasons.most_common(5)))
        if len(reports) < len(planned):
            raise AirflowFailException(f"{len(planned) - len(reports)} of {len(planned)} partitions did not finish; "
                                       f"see the deliver task logs. Clearing the failed tasks re-sends what is "
                                       f"missing.")
        return dict(total)


class CompletenessSweepOperator(_ConfiguredOperator):
    """Deliver whatever the horizon holds that is neither delivered nor rejected; log a per-day table."""

    def execute(self, context: Any) -> dict:
        settings = self.settings()
        destination = get_destination(self.destination, settings)
        end = datetime.fromtimestamp(context["data_interval_end"].timestamp(), UTC)
        window = Window(end - settings.sweep.horizon, end)
        run = RunRef(dag_id=context["dag"].dag_id, run_id=context["run_id"])
        warehouse, ledger_engine = self.engines(settings)
        ledger = Ledger(ledger_engine, settings.ledger.schema_)
        ledger.create()
        hook = HOOKS[self.destination](destination.settings.conn_id, destination.settings,
                                       rate_limit_storage=settings.airflow.rate_limit_storage)
        try:
            with hook:
                report = sweep(engine=warehouse, schema=settings.source.schema_, tables=settings.source.events,
                               window=window, loaded_at_column=settings.source.loaded_at_column,
                               destination=destination, ledger=ledger, chunk_size=settings.source.chunk_size,
                               now=datetime.now(UTC), sender=hook, run=run,
                               concurrency=destination.settings.concurrency)
        finally:
            warehouse.dispose()
            ledger_engine.dispose()
        for delivery in report.deliveries:
            self.log.info("%s", delivery.render())
        self.log.info("%s", report.render())
        if report.missing_before:
            self.log.warning("the sweep found %d events the hourly runs missed: rows loaded later than "
                             "source.lookback (%s); consider raising it", report.missing_before,
                             settings.source.lookback)
        if report.missing_after:
            raise RuntimeError(f"{report.missing_after} events are still neither delivered nor rejected")
        return report.to_dict()
