"""Operators that wire the delivery core to Airflow: context -> window, connections -> a delivery job.

Like the HTTP provider's ``HttpOperator``, these only gather arguments and wire the hook; the work
is in ``usage_billing.delivery`` (the core) and the destination hooks (transport).

* :class:`PlanPartitionsOperator` validates the configuration, checks which event tables exist and
  returns the partitions to deliver (a small list, the only data passed through XCom);
* :class:`SegmentDeliveryOperator` delivers one partition to one destination and logs its summary;
* :class:`QueuedBackfillOperator` sends what the partitions queued past the grace period, one
  backfill per UTC day for the whole run;
* :class:`DeliveryReportOperator` adds the partitions' summaries up and fails the run if any failed.

The delivery core and the hooks (pandas, pyarrow, requests) are imported inside ``execute()``:
Airflow imports this module whenever it parses a DAG file, in the DAG processor and in every task
process, and most of those never deliver anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from billing_airflow.operators.run_request import DELIVER, MODES, REPLACE, REPLAY_REJECTED, run_request
from usage_billing.destinations import DESTINATIONS, Destination, get_destination
from usage_billing.destinations.kind import Capabilities
from usage_billing.ledger import Ledger, RunRef
from usage_billing.settings import ConfigError, Settings, load_settings
from usage_billing.sources import Partition, Source, Window, kind_for
from usage_billing.sources.postgres import create_engine
from usage_billing.sources.postgres.connection import connection_type, ledger_url

if TYPE_CHECKING:
    from billing_airflow.hooks.base import BillingApiHook


def hook_class(destination: str) -> type[BillingApiHook]:
    """The Airflow hook of a registered destination."""
    module, _, name = DESTINATIONS[destination].hook.rpartition(".")
    return getattr(importlib.import_module(module), name)


def open_hook(destination: Destination, settings: Settings) -> BillingApiHook:
    return hook_class(destination.name)(destination.settings.conn_id, destination.settings,
                                        rate_limit_storage=settings.airflow.rate_limit_storage)


@contextlib.contextmanager
def open_warehouse(settings: Settings) -> Iterator[tuple[Source, Ledger]]:
    """The source (its kind picked by the connection's type) and the ledger, closed afterwards.

    The ledger shares the source's engine when both name the same connection and the source can
    host it, so the "already delivered" filter runs inside the extraction query."""
    kind = kind_for(connection_type(settings.source.conn_id))
    same_connection = settings.ledger.conn_id == settings.source.conn_id
    if same_connection and not kind.hosts_ledger:
        raise ConfigError(f"ledger.conn_id: the ledger needs a transactional database with primary keys and locks "
                          f"(PostgreSQL), which {kind.name} is not; point ledger.conn_id at a postgres connection "
                          f"other than source.conn_id {settings.source.conn_id!r}")
    if not same_connection:
        ledger_url(settings.ledger.conn_id)  # a ledger connection of the wrong type fails before any read
    source = kind.open(settings)
    try:
        if same_connection:
            yield source, Ledger(source.engine, settings.ledger.schema_)
        else:
            with open_ledger(settings) as ledger:
                yield source, ledger
    finally:
        source.close()


@contextlib.contextmanager
def open_ledger(settings: Settings) -> Iterator[Ledger]:
    """The ledger alone, on an engine of its own (closed afterwards); ``ledger.conn_id`` must be a
    postgres (or sqlite) connection."""
    engine = create_engine(ledger_url(settings.ledger.conn_id), [settings.ledger.schema_])
    try:
        yield Ledger(engine, settings.ledger.schema_)
    finally:
        engine.dispose()


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


class PlanPartitionsOperator(_ConfiguredOperator):
    """Validate the configuration and list the window's partitions (event table x hash bucket)."""

    def execute(self, context: Any) -> list[dict]:
        settings = self.settings()
        destination = get_destination(self.destination, settings)  # fails here, once, on a missing section
        request = run_request(context, settings, self.mode, self.destination)
        self.log.info("%s", request.echo)
        mode, reason_contains, window = request.mode, request.reason_contains, request.window
        with open_warehouse(settings) as (source, ledger):
            ledger.create()
            if mode == REPLAY_REJECTED:
                tables = ledger.rejected_tables(self.destination, reason_contains)
                self.log.info("plan: replay of rejected %s events%s in tables %s", self.destination,
                              f" whose reason contains {reason_contains!r}" if reason_contains else "", tables)
                return [Partition(table).to_dict() for table in tables]
            if mode == REPLACE:
                if not destination.capabilities.backfills:
                    raise ValueError(f"mode=replace needs backfills, which {self.destination} does not have")
                self.log.warning("plan: REPLACE MODE for %s: one task re-sends every event with a timestamp in "
                                 "[%s, %s) inside one replacing backfill", self.destination,
                                 window.start.isoformat(), window.end.isoformat())
                return [Partition(ALL_TABLES).to_dict()]
            partitions, lines, columns = [], [], {}
            config = settings.source
            for table in config.events:
                columns[table] = source.table_columns(table)
                if columns[table] is None:
                    lines.append(f"  {config.schema_}.{table:<24} missing (no event of this type loaded yet)")
                    continue
                # No row count here: each deliver task counts its window's events anyway (its summary
                # says how many), and a full-window count per table cost plan as long as a rerun's filter.
                lines.append(f"  {config.schema_}.{table:<24} present, {len(columns[table])} columns")
                buckets = settings.airflow.partitions_per_table
                partitions += [Partition(table, bucket, buckets).to_dict() for bucket in range(buckets)]
        self.log.info("plan: destination=%s window %s on %s\n%s\n  -> %d partitions",
                      self.destination, window, config.loaded_at_column, "\n".join(lines), len(partitions))
        check_fields(destination, {t: c for t, c in columns.items() if c is not None}, config.schema_, self.log)
        return partitions


class SegmentDeliveryOperator(_ConfiguredOperator):
    """Deliver one partition of the run's window to one destination."""

    template_fields = ("partition",)

    def __init__(self, *, partition: dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.partition = partition

    def execute(self, context: Any) -> dict:
        from usage_billing.delivery import DeliveryJob, deliver_window, replace_window, replay_rejected

        settings = self.settings()
        destination = get_destination(self.destination, settings)
        request = run_request(context, settings, self.mode, self.destination)
        self.log.info("%s", request.echo)
        mode, reason_contains, window = request.mode, request.reason_contains, request.window
        partition = Partition.from_dict(self.partition or {"table": settings.source.events[0]})
        run = RunRef(dag_id=context["dag"].dag_id, run_id=context["run_id"])
        hook = open_hook(destination, settings)
        with open_warehouse(settings) as (source, ledger), hook:
            job = DeliveryJob.from_settings(settings, destination, source, ledger, hook, run)
            # The run's backfill task sends the late events of every partition (see backfill_task_of).
            job = dataclasses.replace(job, backfill_per_run=backfill_task_of(destination.capabilities, mode))
            try:
                if mode == REPLAY_REJECTED:
                    report = replay_rejected(job, partition.table, reason_contains)
                elif mode == REPLACE:
                    report = replace_window(job, settings.source.events, window)
                else:
                    report = deliver_window(job, partition, window)
            except Exception:
                self.log.error("delivery failed: destination=%s partition=%s mode=%s window %s", self.destination,
                               partition, mode, window)
                raise
        self.log.info("%s", report.render())
        if report.lateness_seconds and max(report.lateness_seconds) > settings.source.lookback.total_seconds():
            self.log.warning("some rows were loaded more than source.lookback (%s) after their event time; "
                             "raise source.lookback or rely on the completeness sweep", settings.source.lookback)
        peak = peak_memory_mb()
        self.log.info("peak memory of this task process: %.0f MB (sizing workers: see the README)", peak)
        return {**report.to_dict(), "peak_mb": round(peak, 1)}


def peak_memory_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB; ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def backfill_task_of(capabilities: Capabilities, mode: str) -> bool:
    """Whether a delivery DAG of this mode has a ``backfill`` task after its deliver tasks: for a
    destination with backfills, except in replace mode (whose one task sends everything into its
    replacing backfill)."""
    return capabilities.backfills and mode != REPLACE


class QueuedBackfillOperator(_ConfiguredOperator):
    """Send the events the run's deliver tasks queued past the grace period: one backfill per UTC
    day of their timestamp for the whole run, instead of one per partition. It also sends what an
    earlier run left queued (a run that failed before its backfill task)."""

    def execute(self, context: Any) -> dict:
        from usage_billing.delivery import DeliveryJob, send_queued

        settings = self.settings()
        destination = get_destination(self.destination, settings)
        run = RunRef(dag_id=context["dag"].dag_id, run_id=context["run_id"])
        hook = open_hook(destination, settings)
        with open_warehouse(settings) as (source, ledger), hook:
            ledger.create()  # it runs even when plan (which creates the ledger) failed
            report = send_queued(DeliveryJob.from_settings(settings, destination, source, ledger, hook, run))
        self.log.info("%s", report.render())
        return report.to_dict()


class DeliveryReportOperator(_ConfiguredOperator):
    """Add up the partitions' summaries; fail the run if a partition did not finish."""

    def __init__(self, *, deliver_task_id: str, plan_task_id: str, backfill_task_id: str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.deliver_task_id = deliver_task_id
        self.plan_task_id = plan_task_id
        self.backfill_task_id = backfill_task_id

    def execute(self, context: Any) -> dict:
        self.refresh_ledger_statistics()
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
        delivered = [r for r in ([pulled] if isinstance(pulled, dict) else list(pulled or [])) if r]
        total: Counter = Counter()
        reasons: Counter = Counter()
        columns = {"unique_events": "events", "already_delivered": "skipped", "queued": "queued", "sent": "sent",
                   "accepted": "accepted", "rejected": "rejected", "rejected_before": "known rej",
                   "requests": "requests", "retries": "retries", "bisections": "bisects"}
        keys = tuple(columns)
        lines = [f"{'partition':<28}" + "".join(f"{header:>10}" for header in columns.values())]
        backfill = ti.xcom_pull(task_ids=self.backfill_task_id) if self.backfill_task_id else None
        # The backfill task's events were read, and counted, by the deliver tasks that queued them.
        rows = delivered + ([{**backfill, "partition": f"backfill ({backfill.get('backfills', 0)} for the run)",
                              "unique_events": 0}] if backfill else [])
        for report in rows:
            total.update({k: report.get(k, 0) for k in keys})
            reasons.update({reason: count for reason, count in report.get("top_reasons", [])})
            lines.append(f"{report['partition']:<28}" + "".join(f"{report.get(k, 0):>10}" for k in keys))
        lines.append(f"{'TOTAL':<28}" + "".join(f"{total[k]:>10}" for k in keys))
        self.log.info("run report: destination=%s, %d of %d partitions reported\n%s%s", self.destination,
                      len(delivered), len(planned), "\n".join(lines),
                      "".join(f"\n  {count:>8} x {reason}" for reason, count in reasons.most_common(5))
                      + "\n  (rejected: this run's rejections; known rej: of those, events already rejected by an "
                        "earlier run)")
        if total["queued"] and self.backfill_task_id and backfill is None:
            task = self.backfill_task_id
            raise AirflowFailException(f"the {task} task did not finish: {total['queued']} events past the grace "
                                       f"period are queued, not sent; clear it to send them (the next run's {task} "
                                       f"task also sends them)")
        if len(delivered) < len(planned):
            raise AirflowFailException(f"{len(planned) - len(delivered)} of {len(planned)} partitions did not finish; "
                                       f"see the deliver task logs. Clearing the failed tasks re-sends what is "
                                       f"missing.")
        # The share is of the deliver tasks' events: what they sent, what they queued for a backfill (whichever
        # run's backfill task then sends it: concurrent runs of a backfill race for each day's queue) and what
        # they rejected; the backfill task's own sends are those queued events, or other runs'.
        share = Counter({k: sum(r.get(k, 0) for r in delivered) for k in ("accepted", "queued")})
        share.update({k: total[k] for k in ("rejected", "rejected_before")})
        check_rejected_share(self.destination, share, reasons, self.settings())
        return dict(total)

    def refresh_ledger_statistics(self) -> None:
        """ANALYZE the ledger when this run's marks left its statistics stale, for the next run's
        "already delivered" filter (:meth:`Ledger.refresh_statistics` says why it is done after the
        deliveries, not in them). First, so a failed partition does not skip it; a failure only
        warns: the statistics help the next run's plan, they decide nothing about billing."""
        try:
            with open_ledger(self.settings()) as ledger:
                if ledger.refresh_statistics():
                    self.log.info("ledger %s: statistics refreshed (ANALYZE) for the next run", ledger.schema)
        except Exception as error:
            self.log.warning("ledger statistics not refreshed (%s): the next run's report tries again", error)


def check_fields(destination: Destination, columns: dict[str, list[str]], schema: str, log: Any) -> None:
    """Name configured fields that no event table has: a required one fails the run before anything
    is sent (every event would be rejected); a property is warned about (Segment adds its column when
    a first value arrives, so it may simply not have arrived yet)."""
    if not columns:
        return
    where = f"any of {', '.join(f'{schema}.{t}' for t in columns)}"
    for required in (True, False):
        missing = set.intersection(*(set(destination.missing_fields(c, required)) for c in columns.values()))
        if missing and required:
            raise ConfigError(f"destinations.{destination.name}: {'; '.join(sorted(missing))} is not a column of "
                              f"{where}: every event would be rejected. Fix the setting (Segment field names, "
                              f"for example userId or context.traits.accountId).")
        for field in sorted(missing):
            log.warning("destinations.%s: %s is not a column of %s yet: no event carries it (a typo, or a "
                        "property that has not arrived yet)", destination.name, field, where)


def check_rejected_share(destination: str, total: Counter, reasons: Counter, settings: Settings) -> None:
    """Fail the run when it rejected more of its events than ``max_rejected_share`` allows.

    Only this run's new rejections count (an event an earlier run already rejected is not a new
    mistake), against the events it settled: accepted, queued for a backfill, plus newly rejected."""
    limit = settings.destination(destination).max_rejected_share
    new = total["rejected"] - total["rejected_before"]
    settled = total["accepted"] + total["queued"] + new
    if settled and new / settled > limit:
        top = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
        raise RuntimeError(f"{destination}: this run rejected {new} of {settled} events ({new / settled:.0%}), more "
                           f"than destinations.{destination}.max_rejected_share ({limit:.0%}). Most often: {top}. "
                           f"Fix the setting or the data, then replay the rejections.")


class CompletenessSweepOperator(_ConfiguredOperator):
    """Deliver whatever the horizon holds that is neither delivered nor rejected; log a per-day table."""

    def execute(self, context: Any) -> dict:
        from usage_billing.delivery import DeliveryJob, sweep

        settings = self.settings()
        destination = get_destination(self.destination, settings)
        end = datetime.fromtimestamp(context["data_interval_end"].timestamp(), UTC)
        window = Window(end - settings.sweep.horizon, end)
        run = RunRef(dag_id=context["dag"].dag_id, run_id=context["run_id"])
        hook = open_hook(destination, settings)
        with open_warehouse(settings) as (source, ledger), hook:
            ledger.create()
            ledger.refresh_statistics()  # not on an hourly run's path: the sweep's filter spans days
            report = sweep(DeliveryJob.from_settings(settings, destination, source, ledger, hook, run),
                           settings.source.events, window)
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
