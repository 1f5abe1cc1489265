"""The DAG files parse cleanly, carry what Airflow users expect, and touch nothing at import."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from tests.conftest import PROJECT


@pytest.fixture(scope="module")
def bag():
    from airflow.models.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT / "dags"))


def test_no_import_errors(bag):
    assert bag.import_errors == {}


@pytest.mark.parametrize("dag_id", ["segment_to_orb", "segment_to_kable"])
def test_delivery_dag_shape(bag, dag_id):
    from airflow.sdk import CronDataIntervalTimetable

    dag = bag.dags[dag_id]
    assert isinstance(dag.timetable, CronDataIntervalTimetable), "an hourly window, not a zero-length trigger"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert {"usage-billing", "segment"} <= set(dag.tags)
    assert dag.doc_md and "Backfill" in dag.doc_md
    assert set(dag.task_dict) == {"plan", "deliver", "report"}
    for task in dag.tasks:
        assert task.retries >= 1
        assert task.retry_delay == timedelta(minutes=2)
    assert dag.task_dict["deliver"].upstream_task_ids == {"plan"}
    assert dag.task_dict["report"].trigger_rule == "all_done"


def test_sweep_dag_shape(bag):
    from airflow.sdk import CronDataIntervalTimetable

    dag = bag.dags["usage_billing_sweep"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert set(dag.task_dict) == {"sweep_orb", "sweep_kable", "reconcile_orb", "reconcile_kable"}
    assert dag.catchup is False and "sweep" in dag.tags and dag.doc_md
    for name in ("orb", "kable"):
        reconcile = dag.task_dict[f"reconcile_{name}"]
        assert reconcile.upstream_task_ids == {f"sweep_{name}"} and reconcile.trigger_rule == "all_done"


def test_reconcile_dag_runs_on_demand_for_a_range(bag):
    dag = bag.dags["usage_billing_reconcile"]
    assert type(dag.timetable).__name__ == "NullTimetable", "triggered by hand only"
    assert set(dag.params) == {"destination", "start", "end"} and dag.params["destination"] == "orb"
    assert set(dag.task_dict) == {"reconcile"} and dag.task_dict["reconcile"].retries >= 1
    assert {"usage-billing", "reconcile"} <= set(dag.tags) and "sample_hours" in dag.doc_md


@pytest.mark.parametrize("dag_id", ["segment_to_orb", "segment_to_kable"])
def test_modes_are_params(bag, dag_id):
    assert bag.dags[dag_id].params["mode"] == "deliver"


def test_import_touches_no_database_or_network(tmp_path, monkeypatch):
    """Parsing with connections pointing nowhere still works: nothing is contacted at import time."""
    from airflow.models.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_WAREHOUSE", '{"conn_type": "postgres", "host": "192.0.2.1"}')
    monkeypatch.setenv("AIRFLOW_CONN_ORB_DEFAULT", '{"conn_type": "http", "host": "http://192.0.2.1:9"}')
    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    assert bag.import_errors == {} and "segment_to_orb" in bag.dags


def test_an_unconfigured_destination_has_no_dag(tmp_path, monkeypatch):
    from airflow.models.dagbag import DagBag

    data = yaml.safe_load((PROJECT / "include" / "usage_billing.yaml").read_text())
    del data["destinations"]["kable"]
    path = tmp_path / "orb-only.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    assert "segment_to_orb" in bag.dags and "segment_to_kable" not in bag.dags
    assert bag.import_errors == {}


def test_an_invalid_config_is_an_import_error_naming_the_setting(tmp_path, monkeypatch):
    from airflow.models.dagbag import DagBag

    data = yaml.safe_load((PROJECT / "include" / "usage_billing.yaml").read_text())
    data["destinations"]["orb"]["properties_mapping"] = {"amount": 5}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    errors = "\n".join(bag.import_errors.values())
    assert "destinations.orb.properties_mapping" in errors and "'amount'" in errors
