"""The DAG files parse cleanly, carry what Airflow users expect, and touch nothing at import."""

from __future__ import annotations

import subprocess
import sys
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


HOURLY = ["segment_to_orb", "segment_to_kable"]
MANUAL = {"segment_to_orb_replace": "replace", "segment_to_orb_replay_rejected": "replay_rejected",
          "segment_to_kable_replay_rejected": "replay_rejected"}


def modes(dag) -> set[str]:
    """The mode each task was built with (a mapped task holds it among its partial() arguments)."""
    return {task.partial_kwargs["mode"] if hasattr(task, "partial_kwargs") else task.mode for task in dag.tasks
            if hasattr(task, "partial_kwargs") or hasattr(task, "mode")}


@pytest.mark.parametrize("dag_id", HOURLY + list(MANUAL))
def test_delivery_dag_shape(bag, dag_id):
    dag = bag.dags[dag_id]
    assert dag.catchup is False and dag.max_active_runs == 1
    assert {"usage-billing", "segment"} <= set(dag.tags)
    assert dag.doc_md
    gate = {"preview", "approve"} if dag_id == "segment_to_orb_replace" else {"gate", "approve"} if dag_id in HOURLY \
        else set()
    # Orb's late events go out one backfill per UTC day for the whole run, after every partition;
    # a replace sends everything into its own replacing backfill, and Kable has no backfills.
    backfill = {"backfill"} if dag_id.startswith("segment_to_orb") and dag_id != "segment_to_orb_replace" else set()
    assert set(dag.task_dict) == {"plan", "deliver", "report"} | gate | backfill
    if backfill:
        assert dag.task_dict["backfill"].upstream_task_ids == {"deliver"}
        assert dag.task_dict["backfill"].trigger_rule == "all_done"
        assert dag.task_dict["report"].upstream_task_ids == {"backfill"}
    for task in dag.tasks:
        # A preview only reads and an approval is a person's answer: retrying either re-asks nobody.
        assert task.retries >= 1 or task.task_id in gate
        assert task.retry_delay == timedelta(minutes=2)
    assert dag.task_dict["deliver"].upstream_task_ids == {"plan"}
    assert dag.task_dict["report"].trigger_rule == "all_done"
    assert dag.task_dict["deliver"].map_index_template


@pytest.mark.parametrize("dag_id", HOURLY)
def test_hourly_dags_have_a_window_and_no_parameter_to_type(bag, dag_id):
    """Trigger and Run Backfill need nothing typed: a string param without a default disables them."""
    from airflow.sdk import CronDataIntervalTimetable

    dag = bag.dags[dag_id]
    assert isinstance(dag.timetable, CronDataIntervalTimetable), "an hourly window, not a zero-length trigger"
    assert "Backfill" in dag.doc_md
    assert dict(dag.params) == {}
    assert modes(dag) == {"deliver"}


@pytest.mark.parametrize(("dag_id", "mode"), MANUAL.items())
def test_replace_and_replay_are_dags_of_their_own_with_the_mode_fixed(bag, dag_id, mode):
    """The mode is the operators' constructor argument: no form, conf or backfill can change it."""
    dag = bag.dags[dag_id]
    assert not dag.timetable.can_be_scheduled, "triggered by hand only (schedule=None): no backfill"
    assert modes(dag) == {mode}
    assert mode in dag.tags


def test_replace_needs_a_period_and_replay_needs_nothing(bag):
    replace = bag.dags["segment_to_orb_replace"].params
    assert set(replace) == {"period_start", "period_end"}
    for name in replace:
        schema = replace.get_param(name).schema
        assert schema["type"] == "string" and schema["format"] == "date-time"
        assert not replace.get_param(name).has_value, "no default: the period is chosen by hand"
    for dag_id in ("segment_to_orb_replay_rejected", "segment_to_kable_replay_rejected"):
        params = bag.dags[dag_id].params
        assert set(params) == {"reason_contains"}
        param = params.get_param("reason_contains")
        # Optional in the UI's forms: null allowed, null default (not "", which the form calls required).
        assert param.value is None and "null" in param.schema["type"]
        params.validate()


def test_a_replace_waits_for_approval_with_its_preview_before_anything_is_planned(bag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    dag = bag.dags["segment_to_orb_replace"]
    preview, approve = dag.task_dict["preview"], dag.task_dict["approve"]
    assert preview.mode == "replace" and preview.run_window, "the preview is of the run's own period"
    assert isinstance(approve, ApprovalOperator) and approve.preview_task_id == "preview"
    assert approve.upstream_task_ids == {"preview"} and dag.task_dict["plan"].upstream_task_ids == {"approve"}
    assert approve.ignore_downstream_trigger_rules, "Reject skips the report (all_done) too: nothing runs"


def config_with(tmp_path, monkeypatch, **airflow) -> None:
    data = yaml.safe_load((PROJECT / "include" / "usage_billing.yaml").read_text())
    data.setdefault("airflow", {}).update(airflow)
    path = tmp_path / "usage_billing.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))


@pytest.mark.parametrize("dag_id", HOURLY)
def test_a_large_backfill_run_is_previewed_and_may_wait_for_approval_before_plan(bag, dag_id):
    """The gate branches to approve (a large backfill run) or straight to plan (every other run)."""
    dag = bag.dags[dag_id]
    gate, approve, plan = dag.task_dict["gate"], dag.task_dict["approve"], dag.task_dict["plan"]
    assert gate.downstream_task_ids == {"approve", "plan"} and gate.mode == "deliver" and gate.run_window
    assert approve.preview_task_id == "gate" and approve.ignore_downstream_trigger_rules
    assert plan.upstream_task_ids == {"gate", "approve"}
    assert plan.trigger_rule == "none_failed_min_one_success", "plan runs when the approval was branched away"


def test_no_backfill_threshold_means_no_gate(tmp_path, monkeypatch):
    from billing_airflow.dag_factory import build_delivery_dag

    config_with(tmp_path, monkeypatch, approve_backfills_above=None)
    dag = build_delivery_dag("orb")
    assert set(dag.task_dict) == {"plan", "deliver", "backfill", "report"} and dag.task_dict["plan"].trigger_rule == "all_success"


def test_a_team_can_turn_the_replace_approval_off(tmp_path, monkeypatch):
    from billing_airflow.dag_factory import build_delivery_dag

    config_with(tmp_path, monkeypatch, approve_replace=False)
    assert set(build_delivery_dag("orb", mode="replace").task_dict) == {"plan", "deliver", "report"}


def test_every_dag_calls_the_configured_alert_on_failure(tmp_path, monkeypatch):
    from airflow.models.dagbag import DagBag

    from billing_airflow.alerts import log_alert

    config_with(tmp_path, monkeypatch, on_failure_callback="billing_airflow.alerts.log_alert")
    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    assert bag.import_errors == {} and len(bag.dags) >= 7
    for dag in bag.dags.values():
        for task in dag.tasks:
            callbacks = task.on_failure_callback
            assert log_alert in (callbacks if isinstance(callbacks, list) else [callbacks]), (dag.dag_id, task)


def test_no_alert_is_configured_by_default(bag):
    assert all(not task.on_failure_callback for dag in bag.dags.values() for task in dag.tasks)


def test_an_unimportable_alert_is_an_import_error_naming_the_setting(tmp_path, monkeypatch):
    from airflow.models.dagbag import DagBag

    config_with(tmp_path, monkeypatch, on_failure_callback="no_such_module.notify")
    errors = "\n".join(DagBag(dag_folder=str(PROJECT / "dags")).import_errors.values())
    assert "airflow.on_failure_callback" in errors and "no_such_module.notify" in errors


@pytest.mark.parametrize("dag_id", HOURLY)
def test_with_a_delivery_deadline_set_the_hourly_dags_have_one_after_the_logical_date(dag_id, tmp_path,
                                                                                     monkeypatch):
    from airflow.models.dagbag import DagBag
    from airflow.sdk.definitions.deadline import DagRunLogicalDateDeadline

    config_with(tmp_path, monkeypatch, delivery_deadline="3h")
    [deadline] = DagBag(dag_folder=str(PROJECT / "dags")).dags[dag_id].deadline
    assert isinstance(deadline.reference, DagRunLogicalDateDeadline)
    assert deadline.interval == timedelta(hours=3)
    assert deadline.callback.path == "billing_airflow.alerts.delivery_deadline_missed"


def test_only_the_hourly_dags_have_a_deadline_and_none_by_default(bag, tmp_path, monkeypatch):
    from airflow.models.dagbag import DagBag

    assert not any(d.deadline for d in bag.dags.values()), "off by default: dag.test() cannot finish such a run"
    config_with(tmp_path, monkeypatch, delivery_deadline="3h")
    assert {d.dag_id for d in DagBag(dag_folder=str(PROJECT / "dags")).dags.values() if d.deadline} == set(HOURLY)


def test_kable_has_no_replace_dag(bag):
    assert "segment_to_kable_replace" not in bag.dags


def test_a_replace_dag_follows_the_declared_backfills_not_the_name(monkeypatch):
    """Re-billing a period needs backfills: the registry's capabilities decide, for any destination."""
    import dataclasses

    from billing_airflow.dag_factory import build_delivery_dag
    from usage_billing.destinations import DESTINATIONS, Capabilities

    with pytest.raises(ValueError, match="kable declares none"):
        build_delivery_dag("kable", mode="replace")
    monkeypatch.setitem(DESTINATIONS, "kable", dataclasses.replace(DESTINATIONS["kable"],
                                                                   capabilities=Capabilities(backfills=True)))
    assert build_delivery_dag("kable", mode="replace").dag_id == "segment_to_kable_replace"
    monkeypatch.setitem(DESTINATIONS, "orb", dataclasses.replace(DESTINATIONS["orb"], capabilities=Capabilities()))
    with pytest.raises(ValueError, match="orb declares none"):
        build_delivery_dag("orb", mode="replace")


def test_every_registered_destination_has_its_hook_and_its_dags(bag):
    """The Airflow surface of a destination: the hook its registry line names, and one DAG file per mode."""
    from billing_airflow.hooks.base import BillingApiHook
    from billing_airflow.operators.deliver import hook_class
    from billing_airflow.operators.run_request import MODES, REPLACE, dag_id_for
    from usage_billing.destinations import DESTINATIONS

    for name, kind in DESTINATIONS.items():
        hook = hook_class(name)
        assert issubclass(hook, BillingApiHook) and hook.destination == name
        modes = [mode for mode in MODES if mode != REPLACE or kind.capabilities.backfills]
        assert {dag_id_for(name, mode) for mode in modes} <= set(bag.dags), name
        assert (PROJECT / "dags" / f"segment_to_{name}.py").is_file()


@pytest.mark.parametrize(("partition", "label"), [
    ({"table": "api_call", "bucket": 0, "buckets": 1}, "api_call"),
    ({"table": "api_call", "bucket": 1, "buckets": 4}, "api_call #2/4"),
    ({"table": "*", "bucket": 0, "buckets": 1}, "all event tables"),
], ids=["one_partition_per_table", "hash_bucket_counted_from_one", "replace_all_tables"])
def test_mapped_deliver_tasks_are_labelled_by_table_and_bucket(bag, partition, label):
    from types import SimpleNamespace

    dag = bag.dags["segment_to_orb"]
    template = dag.task_dict["deliver"].map_index_template
    rendered = dag.get_template_env().from_string(template).render(task=SimpleNamespace(partition=partition))
    assert rendered == label


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


def test_import_touches_no_database_or_network(tmp_path, monkeypatch):
    """Parsing with connections pointing nowhere still works: nothing is contacted at import time."""
    from airflow.models.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_WAREHOUSE", '{"conn_type": "postgres", "host": "192.0.2.1"}')
    monkeypatch.setenv("AIRFLOW_CONN_ORB_DEFAULT", '{"conn_type": "http", "host": "http://192.0.2.1:9"}')
    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    assert bag.import_errors == {} and "segment_to_orb" in bag.dags


#: What only a task needs: the DAG processor and every task process parse the DAG files, and these
#: took about a second of each parse (importing pandas alone about 0.35 s).
TASK_ONLY_MODULES = ("pandas", "pyarrow", "numpy", "alembic", "requests", "limits", "tenacity", "msgspec",
                     "usage_billing.delivery", "usage_billing.ledger.migrate", "billing_airflow.hooks.base")


def test_parsing_the_dag_files_imports_nothing_only_a_task_needs():
    """In a fresh interpreter (this session has imported everything already): Airflow first, then the DAG bag."""
    script = f"""
import sys
from airflow.dag_processing.dagbag import DagBag
import airflow.sdk
before = set(sys.modules)
bag = DagBag(dag_folder={str(PROJECT / "dags")!r})
assert bag.import_errors == {{}} and "segment_to_orb" in bag.dags, bag.import_errors
print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {TASK_ONLY_MODULES!r}
             or m in {TASK_ONLY_MODULES!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_unconfigured_destination_has_no_dag(tmp_path, monkeypatch):
    from airflow.models.dagbag import DagBag

    data = yaml.safe_load((PROJECT / "include" / "usage_billing.yaml").read_text())
    del data["destinations"]["kable"]
    path = tmp_path / "orb-only.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    assert "segment_to_orb" in bag.dags and "segment_to_kable" not in bag.dags
    assert "segment_to_orb_replay_rejected" in bag.dags and "segment_to_kable_replay_rejected" not in bag.dags
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
