"""End to end: the real DAGs, in-process with dag.test(), on PostgreSQL, against both sandboxes.

Runs `segment_to_orb` and `segment_to_kable` over the same hourly intervals, then again, and checks
that every deliverable event of those windows reached each sandbox exactly once, every other one
is in the ledger with a reason, and the second pass sent nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import PROJECT
from tests.integration.conftest import connection_env, start_sandbox
from usage_billing import sample_data
from usage_billing.delivery.sweep import whole_days
from usage_billing.ledger import Ledger
from usage_billing.sources import Window

HOURS = 4


@pytest.fixture
def stack(airflow_db, pg_url, pg_engine, schemas, monkeypatch, tmp_path, request):
    from tests.integration.conftest import config

    schema, ledger_schema = schemas
    now = datetime.now(UTC)
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    first_hour = last_hour - timedelta(hours=HOURS)
    sample_data.generate(pg_engine, schema, sample_data.Sample(start=first_hour - timedelta(hours=6), hours=HOURS + 6,
                                                               events_per_hour=40, seed=5, now=now))
    path = tmp_path / "usage_billing.yaml"
    settings = config(schema, ledger_schema)
    # dag.test() of Airflow 3.3.2 cannot finish a run of a DAG with a DeadlineAlert (DagRun.update_state
    # looks the SDK's alert objects up as database ids); a real scheduler runs them (tests/browser).
    settings["airflow"]["delivery_deadline"] = None
    settings["airflow"].update(getattr(request, "param", {}))
    path.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    url = sa.make_url(pg_url)
    monkeypatch.setenv("AIRFLOW_CONN_SEGMENT_WAREHOUSE", url.set(drivername="postgresql").render_as_string(False))
    with start_sandbox("orb") as orb, start_sandbox("kable") as kable:
        for name, box in (("orb", orb), ("kable", kable)):
            for key, value in connection_env(name, box.url).items():
                monkeypatch.setenv(key, value)
        yield {"orb": orb, "kable": kable, "first_hour": first_hour, "schema": schema,
               "ledger": Ledger(pg_engine, ledger_schema), "engine": pg_engine, "config": path}


def expected_ids(stack, user_id_present: bool) -> set[str]:
    """Ids loaded (received_at) inside the windows the runs scanned: [first - lookback, last)."""
    start = stack["first_hour"] - timedelta(hours=6)
    end = stack["first_hour"] + timedelta(hours=HOURS)
    condition = "user_id IS NOT NULL" if user_id_present else "user_id IS NULL"
    ids: set[str] = set()
    with stack["engine"].connect() as conn:
        for table in ("api_call", "payment_confirmed", "tokens_used"):
            rows = conn.execute(sa.text(f'SELECT id FROM "{stack["schema"]}".{table} '
                                        f"WHERE received_at >= :s AND received_at < :e AND {condition}"),
                                {"s": start, "e": end})
            ids.update(r[0] for r in rows)
    return ids


def run_hours(dag, first_hour: datetime) -> list:
    runs = []
    for hour in range(HOURS):
        run = dag.test(logical_date=first_hour + timedelta(hours=hour + 1))
        assert run.data_interval_start == first_hour + timedelta(hours=hour)
        assert run.data_interval_end == first_hour + timedelta(hours=hour + 1)
        runs.append(run)
    return runs


def test_both_dags_deliver_each_event_exactly_once_and_a_second_pass_sends_nothing(stack):
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    assert bag.import_errors == {}
    deliverable = expected_ids(stack, True)
    anonymous = expected_ids(stack, False)
    assert deliverable and anonymous

    for name in ("orb", "kable"):
        runs = run_hours(bag.dags[f"segment_to_{name}"], stack["first_hour"])
        assert [r.state for r in runs] == [DagRunState.SUCCESS] * HOURS
        box = stack["orb" if name == "orb" else "kable"]
        assert box.accepted_keys() == deliverable
        assert len(box.accepted()) == len(deliverable), "no event twice"
        counts = stack["ledger"].counts(name)[name]
        assert counts == {"delivered": len(deliverable), "rejected": len(anonymous)}
        assert {r["idempotency_key"] for r in stack["ledger"].rejected(name)} == anonymous

    requests = {name: len(stack[name].requests) for name in ("orb", "kable")}
    for name in ("orb", "kable"):
        runs = run_hours(bag.dags[f"segment_to_{name}"], stack["first_hour"])
        assert [r.state for r in runs] == [DagRunState.SUCCESS] * HOURS
    assert {name: len(stack[name].requests) for name in ("orb", "kable")} == requests
    assert stack["orb"].accepted_keys() == stack["kable"].accepted_keys() == deliverable


# The replace's approval gate waits for a person in the UI; tests/browser approves and rejects it there.
@pytest.mark.parametrize("stack", [{"approve_replace": False}], indirect=True)
def test_replay_replace_and_sweep_through_the_dags(stack):
    """The replay and replace DAGs and the sweep DAG, end to end."""
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    orb_dag = bag.dags["segment_to_orb"]
    run_hours(orb_dag, stack["first_hour"])
    anonymous = expected_ids(stack, False)
    with stack["engine"].begin() as conn:  # fix the data: the anonymous events get their customer
        for table in ("api_call", "payment_confirmed", "tokens_used"):
            conn.execute(sa.text(f'UPDATE "{stack["schema"]}".{table} SET user_id = anonymous_id WHERE user_id IS NULL'))
    last = stack["first_hour"] + timedelta(hours=HOURS)
    replay = bag.dags["segment_to_orb_replay_rejected"].test(logical_date=None)
    assert replay.state == DagRunState.SUCCESS
    assert stack["orb"].accepted_keys() >= anonymous
    assert stack["ledger"].counts("orb")["orb"].get("rejected", 0) == 0

    period = {"period_start": (last - timedelta(hours=1)).isoformat(), "period_end": last.isoformat()}
    replace = bag.dags["segment_to_orb_replace"].test(logical_date=None, run_conf=period)
    assert replace.state == DagRunState.SUCCESS
    replaced = [b for b in stack["orb"].backfills() if b["replace_existing_events"]]
    assert len(replaced) == 1 and replaced[0]["status"] == "reflected"
    assert len(stack["orb"].accepted()) == len(stack["orb"].accepted_keys()), "no event twice"

    # A row loaded two days ago, behind every hourly run's lookback: only the sweep can find it.
    missed = "missed-by-the-hourly-runs"
    with stack["engine"].begin() as conn:
        table = f'"{stack["schema"]}".api_call'
        conn.execute(sa.text(f"CREATE TEMP TABLE missed AS SELECT * FROM {table} WHERE user_id IS NOT NULL LIMIT 1"))
        conn.execute(sa.text("UPDATE missed SET id = :id, received_at = now() - interval '2 days', "
                             "timestamp = now() - interval '1 hour'"), {"id": missed})
        conn.execute(sa.text(f"INSERT INTO {table} SELECT * FROM missed"))
    sweep_run = bag.dags["usage_billing_sweep"].test(logical_date=datetime.now(UTC))
    assert sweep_run.state == DagRunState.SUCCESS
    for name in ("orb", "kable"):
        assert missed in stack[name].accepted_keys(), f"the sweep delivered the missed row to {name}"
        assert stack["ledger"].status_of(name, [missed]) == {missed: "delivered"}
        assert len(stack[name].accepted()) == len(stack[name].accepted_keys()), "the sweep sent nothing twice"
    # Its count of each whole event day of the horizon (default 7 days), for the Billing view.
    end = sweep_run.data_interval_end
    horizon = whole_days(Window(end - timedelta(days=7), end))
    stored = stack["ledger"].day_counts_table.c
    with stack["engine"].connect() as conn:
        counted = conn.execute(sa.select(stored.destination, stored.day, stored.run_id, stored.warehouse,
                                         stored.warehouse - stored.delivered - stored.rejected - stored.held)).all()
    assert sorted((d, day) for d, day, *_ in counted) == sorted((d, day) for d in ("kable", "orb") for day in horizon)
    assert {(run_id, missing) for *_, run_id, _, missing in counted} == {(sweep_run.run_id, 0)}


@pytest.mark.parametrize("stack", [{"partitions_per_table": 3, "max_active_tis_per_dag": 2}], indirect=True)
def test_a_window_split_into_hash_partitions_is_delivered_once_by_mapped_tasks(stack):
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    # Rows loaded in the first hour whose events lie two and three days back, in every table: past
    # Orb's grace period, found by all nine partitions, sent in one backfill per UTC day for the run.
    late_days: set = set()
    with stack["engine"].begin() as conn:
        for table in ("api_call", "payment_confirmed", "tokens_used"):
            qualified = f'"{stack["schema"]}".{table}'
            for days in (2, 3):
                conn.execute(sa.text(
                    f"INSERT INTO {qualified} SELECT DISTINCT ON (id) * FROM {qualified} WHERE user_id IS NOT NULL "
                    f"AND received_at < :first AND id NOT LIKE 'late-%' LIMIT 6"), {"first": stack["first_hour"]})
                conn.execute(sa.text(
                    f"UPDATE {qualified} SET id = 'late-{days}d-' || id, received_at = :loaded, "
                    f"timestamp = timestamp - interval '{days} days' WHERE ctid IN (SELECT ctid FROM {qualified} "
                    f"WHERE id NOT LIKE 'late-%' AND received_at < :first ORDER BY ctid DESC LIMIT 6)"),
                    {"loaded": stack["first_hour"] + timedelta(minutes=20), "first": stack["first_hour"]})
            late_days |= set(conn.execute(sa.text(
                f"SELECT DISTINCT (timestamp AT TIME ZONE 'UTC')::date FROM {qualified} WHERE id LIKE 'late-%'")).scalars())
    assert len(late_days) >= 2
    dag = DagBag(dag_folder=str(PROJECT / "dags")).dags["segment_to_orb"]
    assert dag.task_dict["deliver"].max_active_tis_per_dag == 2
    runs = run_hours(dag, stack["first_hour"])
    assert [r.state for r in runs] == [DagRunState.SUCCESS] * HOURS
    mapped = [ti for ti in runs[0].get_task_instances() if ti.task_id == "deliver"]
    assert len(mapped) == 3 * 3, "3 event tables x 3 hash buckets"
    deliverable = expected_ids(stack, True)
    assert stack["orb"].accepted_keys() == deliverable and len(stack["orb"].accepted()) == len(deliverable)
    late = {key for key in deliverable if key.startswith("late-")}
    assert len(late) == 3 * 2 * 6
    first_run = [b for b in stack["ledger"].backfill_records("orb") if b["run_id"] == runs[0].run_id]
    assert sorted(b["timeframe_start"].astimezone(UTC).date() for b in first_run) == sorted(late_days), \
        "one backfill per UTC day for the whole run, not one per partition"
    assert sum(b["events_sent"] for b in first_run) == len(late)


def test_a_customer_field_that_no_table_has_fails_the_run_and_sends_nothing(stack):
    """An operator mistake is loud: the run fails at plan, naming the setting, before anything is sent."""
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    config = yaml.safe_load(stack["config"].read_text())
    config["destinations"]["orb"]["external_customer_id_field"] = "context.traits.acount_id"
    stack["config"].write_text(yaml.safe_dump(config))
    dag = DagBag(dag_folder=str(PROJECT / "dags")).dags["segment_to_orb"]
    run = dag.test(logical_date=stack["first_hour"] + timedelta(hours=1))
    assert run.state == DagRunState.FAILED
    plan = next(ti for ti in run.get_task_instances() if ti.task_id == "plan")
    assert plan.state == "failed"
    assert not stack["orb"].requests, "nothing was sent"


def test_a_dry_run_dag_previews_a_replace_and_sends_and_writes_nothing(stack):
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(PROJECT / "dags"))
    run_hours(bag.dags["segment_to_orb"], stack["first_hour"])
    requests, counts = len(stack["orb"].requests), stack["ledger"].counts("orb")
    backfills = len(stack["orb"].backfills())
    hour = stack["first_hour"] + timedelta(hours=1)
    run = bag.dags["usage_billing_dry_run"].test(run_conf={
        "destination": "orb", "mode": "replace", "start": hour.isoformat(), "end": (hour + timedelta(hours=1)).isoformat()})
    assert run.state == DagRunState.SUCCESS
    preview = run.get_task_instance("preview").xcom_pull(task_ids="preview")
    assert preview["mode"] == "replace" and preview["would_send"] > 0
    assert preview["in_backfills"] == preview["would_send"], "a replace sends everything inside its backfill"
    ingest = [r for r in stack["orb"].requests[requests:] if r.path.endswith("/ingest")]
    assert not ingest and len(stack["orb"].backfills()) == backfills, "nothing sent, no backfill created"
    assert stack["ledger"].counts("orb") == counts, "nothing written to the ledger"


def test_a_run_without_a_logical_date_delivers_the_last_complete_hour(stack):
    """`airflow dags trigger segment_to_orb` (no --logical-date): no data interval, no KeyError."""
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    dag = DagBag(dag_folder=str(PROJECT / "dags")).dags["segment_to_orb"]
    last_hour = stack["first_hour"] + timedelta(hours=HOURS)
    run = dag.test(logical_date=None, run_after=last_hour + timedelta(minutes=30))
    assert run.data_interval_start is None and run.state == DagRunState.SUCCESS
    in_last_hour = {r["idempotency_key"] for r in stack["orb"].accepted()}
    assert in_last_hour, "the last complete hour (and its lookback) was delivered"
    with stack["engine"].connect() as conn:
        loaded_after = {r[0] for table in ("api_call", "payment_confirmed", "tokens_used") for r in conn.execute(
            sa.text(f'SELECT id FROM "{stack["schema"]}".{table} WHERE received_at >= :e'), {"e": last_hour})}
    assert not in_last_hour & loaded_after, "nothing loaded after the window's end"


@pytest.mark.parametrize("stack", [{"retries": 3}], indirect=True)
def test_a_mode_in_the_conf_of_the_hourly_dag_fails_the_run_without_retrying(stack):
    """The old README's `--conf '{"mode": "replay_rejected"}'` must not silently deliver instead."""
    from airflow.models.dagbag import DagBag
    from airflow.utils.state import DagRunState

    dag = DagBag(dag_folder=str(PROJECT / "dags")).dags["segment_to_orb"]
    run = dag.test(logical_date=stack["first_hour"] + timedelta(hours=1), run_conf={"mode": "replay_rejected"})
    assert run.state == DagRunState.FAILED
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    assert dag.task_dict["plan"].retries == dag.task_dict["report"].retries == 3
    for task_id in ("plan", "report"):  # a retry would hold the DAG's only active-run slot for minutes
        assert tis[task_id].state == "failed" and tis[task_id].try_number == 1, f"{task_id}: failed at once"
    assert stack["orb"].accepted() == []
