"""Scale-out proof: a backfill of `segment_to_orb` spread over two Celery workers, without containers.

Starts on loopback, each as its own process: the Orb sandbox, the Airflow api-server, scheduler and
dag-processor, and two Celery workers (``worker-a@<host>``, ``worker-b@<host>``, two slots each) on
the local Redis (database 5) with a fresh PostgreSQL metadata database. A backfill of 12 hourly runs
(gate -> plan -> 6 mapped deliver tasks -> backfill -> report each) then runs over sample data.

Asserted:

* all 12 backfill runs succeed, with the 12 consecutive hourly data intervals asked for;
* task instances ran on both workers, and each on exactly one of them;
* every deliverable event of the backfill's windows reached the sandbox exactly once: the accepted
  keys are the expected ones, none twice, and the sandbox saw no re-sent key;
* the ledger agrees: its delivered keys are the sandbox's, anonymous events are rejected, nothing
  is left pending.

Which worker ran a task instance: ``task_instance.hostname`` holds the machine's FQDN
(``[core] hostname_callable``), the same for both workers on one machine, so it cannot tell them
apart. Each worker writes, when it starts a workload, ``[<celery task id>] Executing workload in
Celery: ... ti=TaskInstanceDTO(id=UUID('<task instance id>'), ...`` to its own log file; the test
maps every task instance id to the worker whose log holds it, and checks that the Celery task id
on that line is the ``task_instance.external_executor_id`` the scheduler recorded when it queued it.

The api-server and the workers' log servers listen on ports picked at random; a start that fails
because another process on the machine took the port first is tried again on a fresh one
(:meth:`Cluster.start_listening`). The api-server starts first: the others need its port.

Skipped, saying why, when Redis at 127.0.0.1:6379 does not answer PING. PostgreSQL must be up
(``TEST_DATABASE_URL``). Every process started is stopped by process group (SIGTERM, then SIGKILL),
also on failure, when the tails of their logs are printed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
import yaml

from tests.celery.cluster import AIRFLOW, Cluster, ClusterError, Started
from tests.conftest import PROJECT
from tests.integration.conftest import ORB_KEY, config, connection_env
from usage_billing import sample_data

pytestmark = pytest.mark.celery

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 5
DAG_ID = "segment_to_orb"
RUNS = 12
LOOKBACK = timedelta(hours=6)  # source.lookback of tests.integration.conftest.config()
WORKERS = ("worker-a", "worker-b")
BACKFILL_TIMEOUT = 12 * 60
EVENT_TABLES = ("api_call", "payment_confirmed", "tokens_used")
EXECUTING = re.compile(r"\[([0-9a-f-]{36})\] Executing workload in Celery: .*?"
                       r"ti=TaskInstanceDTO\(id=UUID\('([0-9a-f-]{36})'\)")


@pytest.fixture
def redis_url() -> str:
    """Redis database 5 on the local server, flushed before and after; skips when Redis is down."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        pytest.skip(f"Celery scale-out test needs Redis: {REDIS_HOST}:{REDIS_PORT} did not answer PING ({error})")
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    client.flushdb()
    client.close()


@pytest.fixture
def metadata_url(redis_url: str, pg_url: str) -> str:
    """A fresh PostgreSQL database for Airflow's metadata and Celery's results, dropped afterwards."""
    name = f"airflow_scaleout_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def airflow_env(home: Path, metadata_url: str, redis_url: str, config_path: Path,
                warehouse_url: str) -> dict[str, str]:
    """The environment the cluster's processes share (the test's own Airflow settings left out).

    The api-server's port is added by :func:`api_env` once the api-server listens on it.
    """
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "USAGE_BILLING"))}
    return {
        **inherited,
        "AIRFLOW_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(PROJECT / "include"), str(PROJECT / "plugins")]),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata_url}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__WORKERS": "1",
        # Task processes talk to the api-server; on a busy 2-core machine 5 s (the default) is tight.
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex * 2,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # Parse each DAG file once at start-up, not every 30 s: the CPU goes to the tasks.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        # Only the backfill creates runs: unpausing must not add a scheduled run for the latest hour.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        # The worker-attribution lines are logged at INFO.
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "USAGE_BILLING_CONFIG": str(config_path),
        "AIRFLOW_CONN_SEGMENT_WAREHOUSE": warehouse_url,
    }


def api_env(port: int) -> dict[str, str]:
    """Where the api-server listens: for itself, and for the task processes calling the Execution API."""
    return {"AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/"}


def worker_command(name: str) -> Callable[[int], list[str]]:
    """``command`` for start_listening: a Celery worker named ``<name>@<host>``, two slots."""
    return lambda _port: [*AIRFLOW, "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", "2"]


def log_server_env(port: int) -> dict[str, str]:
    """A worker's log server port: two workers on one machine cannot share the default one."""
    return {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(port)}


@pytest.mark.timeout(20 * 60)
def test_backfill_spreads_over_two_celery_workers_and_delivers_each_event_once(
        redis_url, metadata_url, pg_url, pg_engine, schemas, tmp_path):
    schema, ledger_schema = schemas
    now = datetime.now(UTC)
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    first_hour = last_hour - timedelta(hours=RUNS)
    sample_data.generate(pg_engine, schema, sample_data.Sample(start=first_hour - LOOKBACK, hours=RUNS + 6,
                                                               events_per_hour=30, seed=7, now=now))
    settings = config(schema, ledger_schema)
    del settings["destinations"]["kable"]  # Orb only: no segment_to_kable DAG to parse and schedule
    # Two hash buckets per table -> 6 mapped deliver tasks per run; no retries: any failure shows.
    settings["airflow"] = {"partitions_per_table": 2, "max_active_tis_per_dag": 4, "retries": 0}
    config_path = tmp_path / "usage_billing.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    warehouse_url = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    home = tmp_path / "airflow"
    env = airflow_env(home, metadata_url, redis_url, config_path, warehouse_url)
    metadata = sa.create_engine(metadata_url)
    timings: dict[str, float] = {}
    started = time.monotonic()

    def mark(step: str) -> None:
        timings[step] = round(time.monotonic() - started, 1)

    with Cluster(tmp_path / "logs", env) as cluster:
        try:
            # The sandbox keeps events up to 48 h old: the windows reach back 18 h (12 runs + lookback).
            # It binds port 0 itself and prints its URL: no port to lose to another process.
            sandbox = cluster.start("sandbox", [sys.executable, "-m", "usage_billing.sandbox", "--orb-port", "0",
                                                "--kable-port", "-1", "--orb-api-key", ORB_KEY,
                                                "--grace-period-hours", "48"])
            orb_url = json.loads(cluster.wait_for_log(sandbox, r'^\{"orb_url"', timeout=60))["orb_url"]
            cluster.env.update(connection_env("orb", orb_url))
            cluster.run("db", "migrate", timeout=300)
            mark("db migrate")
            _, api_port = cluster.start_listening("api-server", lambda _port: [*AIRFLOW, "api-server"],
                                                  env=api_env, ready=api_answers)
            cluster.env.update(api_env(api_port))
            mark("api-server up")
            for command in ("scheduler", "dag-processor"):
                cluster.start_airflow(command)
            # start_listening returns once a worker's log server listens; "ready." (Celery) comes later.
            workers = {name: cluster.start_listening(name, worker_command(name), env=log_server_env)[0]
                       for name in WORKERS}
            wait_for_dag(cluster, metadata)
            for name, worker in workers.items():
                cluster.wait_for_log(worker, rf"{name}@\S+ ready\.", timeout=180)
            mark("cluster up")

            cluster.run("dags", "unpause", DAG_ID)
            cluster.run("backfill", "create", "--dag-id", DAG_ID, "--from-date", first_hour.isoformat(),
                        "--to-date", (last_hour - timedelta(hours=1)).isoformat(), "--max-active-runs", "4")
            runs = wait_for_backfill(cluster, metadata)
            mark("backfill done")

            assert sorted((r.data_interval_start, r.data_interval_end) for r in runs) == [
                (first_hour + timedelta(hours=h), first_hour + timedelta(hours=h + 1)) for h in range(RUNS)]
            assert Counter(r.state for r in runs) == {"success": RUNS}, failed_task_logs(home)

            tis = backfill_task_instances(metadata)
            # A backfill under airflow.approve_backfills_above never waits: its gate skips the approval.
            approvals = [ti for ti in tis if ti.task_id == "approve"]
            assert [ti.state for ti in approvals] == ["skipped"] * RUNS
            ran = [ti for ti in tis if ti.task_id != "approve"]
            assert [ti for ti in ran if ti.state != "success"] == [], failed_task_logs(home)
            assert Counter(ti.task_id for ti in ran) == {"gate": RUNS, "plan": RUNS,
                                                         "deliver": RUNS * 2 * len(EVENT_TABLES),
                                                         "backfill": RUNS, "report": RUNS}
            ran_on = attribute_to_workers(ran, workers)
            per_worker = Counter(ran_on.values())
            assert set(per_worker) == set(WORKERS), f"task instances per worker: {dict(per_worker)}"

            deliverable = warehouse_ids(pg_engine, schema, first_hour - LOOKBACK, last_hour, deliverable=True)
            anonymous = warehouse_ids(pg_engine, schema, first_hour - LOOKBACK, last_hour, deliverable=False)
            assert deliverable and anonymous
            events = requests.get(f"{orb_url}/_sandbox/events", timeout=30).json()
            # The sandbox stores each idempotency key once and counts the events sent again with a key
            # it already accepted: "exactly once" is the expected key set and no such re-send.
            keys = {event["idempotency_key"] for event in events["accepted"]}
            assert keys == deliverable
            assert events["duplicates"] == 0, f"{events['duplicates']} events were sent again after acceptance"

            ledger = ledger_keys(pg_engine, ledger_schema)
            assert ledger.keys() <= {"delivered", "rejected"}, f"left pending: {ledger.get('pending')}"
            assert ledger["delivered"] == keys
            assert ledger["rejected"] == anonymous
            mark("asserted")
        except BaseException:
            print(f"\n=== failed after {time.monotonic() - started:.0f} s ({timings}; start-up retries: "
                  f"{cluster.retries or 'none'}); process logs ===\n"
                  f"{cluster.log_tails(60)}")
            raise
        finally:
            metadata.dispose()
    mark("stopped")
    print(f"\nscale-out timings (s since start): {timings}; task instances per worker: {dict(per_worker)}; "
          f"{len(deliverable)} events delivered once each; start-up retries: {cluster.retries or 'none'}")


def api_answers(_api_server: Started, port: int) -> bool:
    """``ready`` for start_listening: the api-server answers, Execution API included."""
    try:
        return all(requests.get(f"http://127.0.0.1:{port}{path}", timeout=5).ok
                   for path in ("/api/v2/monitor/health", "/execution/health"))
    except requests.RequestException:
        return False


def wait_for_dag(cluster: Cluster, metadata: sa.Engine, timeout: float = 180) -> None:
    """Wait until the dag-processor has serialized the DAG; fail at once on an import error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_running()
        with metadata.connect() as conn:
            errors = conn.execute(sa.text("SELECT filename, stacktrace FROM import_error")).all()
            if errors:
                raise ClusterError(f"DAG import errors: {errors}")
            if conn.execute(sa.text("SELECT 1 FROM serialized_dag WHERE dag_id = :d"), {"d": DAG_ID}).first():
                return
        time.sleep(1)
    raise ClusterError(f"{DAG_ID} was not parsed within {timeout} s")


def wait_for_backfill(cluster: Cluster, metadata: sa.Engine) -> list:
    """Wait (bounded) until all runs of the DAG's backfill are finished; those runs."""
    deadline = time.monotonic() + BACKFILL_TIMEOUT
    runs: list = []
    while time.monotonic() < deadline:
        cluster.check_running()
        with metadata.connect() as conn:
            runs = conn.execute(sa.text(
                "SELECT dr.run_id, dr.state, dr.data_interval_start, dr.data_interval_end FROM dag_run dr "
                "JOIN backfill b ON b.id = dr.backfill_id WHERE b.dag_id = :d"), {"d": DAG_ID}).all()
        if len(runs) == RUNS and all(r.state in ("success", "failed") for r in runs):
            return runs
        time.sleep(3)
    raise ClusterError(f"backfill not finished after {BACKFILL_TIMEOUT} s: {Counter(r.state for r in runs)}")


def backfill_task_instances(metadata: sa.Engine) -> list:
    with metadata.connect() as conn:
        return conn.execute(sa.text(
            "SELECT CAST(ti.id AS text) AS id, ti.task_id, ti.map_index, ti.run_id, ti.state, ti.hostname, "
            "ti.external_executor_id FROM task_instance ti "
            "JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id "
            "WHERE ti.dag_id = :d AND dr.backfill_id IS NOT NULL"), {"d": DAG_ID}).all()


def attribute_to_workers(tis: list, workers: dict) -> dict[str, str]:
    """Task instance id -> the worker whose log says it executed it (see the module docstring)."""
    executed: dict[str, list[tuple[str, str]]] = {}
    for name, worker in workers.items():
        for celery_id, ti_id in EXECUTING.findall(worker.log.read_text(errors="replace")):
            executed.setdefault(ti_id, []).append((name, celery_id))
    assert executed, "no 'Executing workload in Celery' line in the worker logs: did the log format change?"
    ran_on = {}
    for ti in tis:
        seen = executed.get(ti.id, [])
        assert len(seen) == 1, f"{ti.task_id}[{ti.map_index}] of {ti.run_id} executed by {seen or 'no worker'}"
        [(name, celery_id)] = seen
        assert celery_id == ti.external_executor_id, f"{ti.task_id} of {ti.run_id}: Celery task id mismatch"
        assert ti.hostname, f"{ti.task_id} of {ti.run_id} has no hostname"
        ran_on[ti.id] = name
    return ran_on


def warehouse_ids(engine: sa.Engine, schema: str, start: datetime, end: datetime, deliverable: bool) -> set[str]:
    """Ids loaded (received_at) in ``[start, end)``: with a user id (deliverable) or anonymous."""
    condition = "user_id IS NOT NULL AND trim(user_id) <> ''"
    ids: set[str] = set()
    with engine.connect() as conn:
        for table in EVENT_TABLES:
            rows = conn.execute(sa.text(
                f'SELECT id FROM "{schema}".{table} WHERE received_at >= :s AND received_at < :e '
                f"AND {'' if deliverable else 'NOT '}({condition})"), {"s": start, "e": end})
            ids.update(r[0] for r in rows)
    return ids


def ledger_keys(engine: sa.Engine, ledger_schema: str) -> dict[str, set[str]]:
    """The ledger's Orb keys by status."""
    by_status: dict[str, set[str]] = {}
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f'SELECT status, idempotency_key FROM "{ledger_schema}".deliveries '
                                    f"WHERE destination = 'orb'"))
        for status, key in rows:
            by_status.setdefault(status, set()).add(key)
    return by_status


def failed_task_logs(home: Path, lines: int = 5) -> str:
    """The last error lines of every task log that has one, for a failed run's assertion message."""
    out = []
    for path in sorted((home / "logs").glob(f"dag_id={DAG_ID}/**/*.log")):
        errors = [line for line in path.read_text(errors="replace").splitlines() if '"level":"error"' in line]
        if errors:
            out.append(f"--- {path.relative_to(home / 'logs')}\n" + "\n".join(e[:2000] for e in errors[-lines:]))
    return "\n".join(out) or "(no task log has an error line)"
