"""The deadline callback and the alert setting: a missed hour is an ERROR naming the DAG and the hour."""

from __future__ import annotations

import logging

import pytest

from billing_airflow import alerts
from usage_billing.settings import ConfigError

CALLS: list[dict] = []


def record(context):
    """An alert callable for the tests: remembers what it was called with."""
    CALLS.append(context)


class Notifier:
    """Stands in for a notifier class named by path: built with no arguments, then called."""

    def __call__(self, context):
        CALLS.append({"notifier": context})


def deadline_context(run_type: str = "scheduled") -> dict:
    """What the scheduler passes a deadline callback (models/deadline.py: get_simple_context)."""
    return {"dag_run": {"dag_id": "segment_to_orb", "dag_run_id": "scheduled__2026-11-01T05:00:00+00:00",
                        "logical_date": "2026-11-01T05:00:00Z", "run_type": run_type, "state": "running"},
            "deadline": {"id": "d1", "deadline_time": "2026-11-01T08:00:00Z"}}


@pytest.fixture(autouse=True)
def _clear():
    CALLS.clear()


def test_a_missed_deadline_logs_an_error_naming_the_dag_and_the_hour_and_calls_the_alert(caplog):
    with caplog.at_level(logging.INFO, logger=alerts.__name__):
        alerts.delivery_deadline_missed(deadline_context(), alert=f"{__name__}.record")
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "DELIVERY DEADLINE MISSED: segment_to_orb" in error.getMessage()
    assert "2026-11-01T05:00:00Z" in error.getMessage() and "2026-11-01T08:00:00Z" in error.getMessage()
    assert CALLS == [deadline_context()]


def test_without_an_alert_the_error_line_is_the_alert(caplog):
    with caplog.at_level(logging.ERROR, logger=alerts.__name__):
        alerts.delivery_deadline_missed(deadline_context())
    assert "DELIVERY DEADLINE MISSED" in caplog.text and CALLS == []


def test_a_backfill_run_past_its_deadline_is_not_alerted(caplog):
    """A backfill's hours are old by design: their deadline passed before the run existed."""
    with caplog.at_level(logging.INFO, logger=alerts.__name__):
        alerts.delivery_deadline_missed(deadline_context("backfill"), alert=f"{__name__}.record")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR] and CALLS == []


def test_a_broken_alert_does_not_hide_the_error(caplog):
    with caplog.at_level(logging.ERROR, logger=alerts.__name__):
        alerts.delivery_deadline_missed(deadline_context(), alert="no_such_module.notify")
    assert "DELIVERY DEADLINE MISSED" in caplog.text and "no_such_module.notify failed" in caplog.text


def test_a_notifier_class_is_built_then_called():
    alerts.resolve_callback(f"{__name__}.Notifier")({"x": 1})
    assert CALLS == [{"notifier": {"x": 1}}]


@pytest.mark.parametrize("path", ["no_such_module.notify", f"{__name__}.missing", f"{__name__}.CALLS"],
                         ids=["module_missing", "name_missing", "not_callable"])
def test_a_bad_alert_path_names_the_setting(path):
    with pytest.raises(ConfigError, match=r"airflow\.on_failure_callback"):
        alerts.resolve_callback(path)
