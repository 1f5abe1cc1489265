"""Loud failures: the team's alert callable on every failed task, and a deadline on every hourly run.

``airflow.on_failure_callback`` names a callable or a notifier by dotted path (for example a module of
the team's own holding ``slack = SlackNotifier(slack_conn_id=..., channel=..., text=...)``); it is put in
every DAG's ``default_args``, so a failed task of any DAG reaches the team, not only the UI.

``airflow.delivery_deadline`` becomes a ``DeadlineAlert`` on the hourly DAGs: an hour whose run has not
finished that long after the hour's start (its logical date) is logged at ERROR, naming the DAG and
the hour, and passed to the same alert callable. A run that fails is already loud through the failure
callback; the deadline catches the quiet cases: a paused DAG, a stuck scheduler, a run waiting on a pool.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from usage_billing.settings import ConfigError, Settings

log = logging.getLogger(__name__)

DEADLINE_CALLBACK = "billing_airflow.alerts.delivery_deadline_missed"


def resolve_callback(path: str) -> Callable[..., Any]:
    """The object at ``package.module.name``; a class (a notifier's) is built with no arguments."""
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"airflow.on_failure_callback: cannot import {path!r} ({error}); give the dotted path "
                          f"of a callable or notifier on the scheduler's and workers' PYTHONPATH") from None
    if isinstance(found, type):
        found = found()
    if not callable(found):
        raise ConfigError(f"airflow.on_failure_callback: {path!r} is a {type(found).__name__}, not a callable")
    return found


def alert_default_args(settings: Settings) -> dict[str, Any]:
    """``{"on_failure_callback": ...}`` for a DAG's default_args, or nothing when none is configured."""
    path = settings.airflow.on_failure_callback
    return {"on_failure_callback": resolve_callback(path)} if path else {}


def delivery_deadline(settings: Settings) -> Any:
    """The hourly DAGs' DeadlineAlert, or None when ``airflow.delivery_deadline`` is None."""
    interval = settings.airflow.delivery_deadline
    if interval is None:
        return None
    from airflow.sdk.definitions.callback import SyncCallback
    from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

    path = settings.airflow.on_failure_callback
    return DeadlineAlert(reference=DeadlineReference.DAGRUN_LOGICAL_DATE, interval=interval,
                         callback=SyncCallback(DEADLINE_CALLBACK, kwargs={"alert": path} if path else None))


def delivery_deadline_missed(context: dict, alert: str | None = None) -> None:
    """Called by Airflow when an hourly run missed ``airflow.delivery_deadline``.

    ``context`` is what the scheduler sends a deadline callback: ``dag_run`` (the run as the REST API
    shows it) and ``deadline``. A backfill's runs are old hours by design, so their deadline passed
    before they were created: they are logged at INFO, not alerted.
    """
    run = context.get("dag_run") or {}
    dag_id, hour = run.get("dag_id", "?"), run.get("logical_date") or run.get("data_interval_start") or "?"
    deadline = (context.get("deadline") or {}).get("deadline_time")
    if run.get("run_type") == "backfill":
        log.info("%s: the backfill run of the hour starting %s finished after its deadline %s (expected for "
                 "old hours)", dag_id, hour, deadline)
        return
    log.error("DELIVERY DEADLINE MISSED: %s has not delivered the hour starting %s by %s (run %s, state %s); "
              "check the run in the UI: a paused DAG, a stuck or failed run, or a full pool", dag_id, hour,
              deadline, run.get("dag_run_id") or run.get("run_id"), run.get("state"))
    if alert:
        try:
            resolve_callback(alert)(context)
        except Exception:  # the ERROR above is the alert of last resort; never lose it to a broken notifier
            log.exception("airflow.on_failure_callback %s failed on the missed deadline of %s", alert, dag_id)


def log_alert(context: Any) -> None:
    """The smallest alert: one ERROR line naming the DAG, the task and the run. A template for your own,
    and what the tests wire in; in production point ``airflow.on_failure_callback`` at a notifier."""
    ti = context.get("ti") or context.get("task_instance")
    run = context.get("dag_run")
    log.error("ALERT: %s failed: task %s, run %s", getattr(ti, "dag_id", None) or getattr(run, "dag_id", "?"),
              getattr(ti, "task_id", "?"), getattr(ti, "run_id", None) or getattr(run, "run_id", "?"))
