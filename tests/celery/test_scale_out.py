"""Scale-out proof: a backfill of `segment_to_orb` on two Celery workers, without containers.

Starts on loopback, as separate processes: the Orb sandbox, the Airflow api-server, scheduler and
dag-processor, and two Celery workers (`worker-a@<host>`, `worker-b@<host>`) on the local Redis
(database 5) and a fresh PostgreSQL metadata database. Creates a backfill of 12 hourly runs over
sample data and checks that tasks ran on both workers, that every deliverable event reached Orb
exactly once, and that the ledger agrees.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.celery.cluster import Cluster, ClusterError, free_port
from tests.conftest import PROJECT
from tests.integration.conftest import ORB_KEY, config, connection_env
from usage_billing import sample_data

pytestmark = pytest.mark.celery

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 5
DAG_ID = "segment_to_orb"
RUNS = 12
LOOKBACK = timedelta(hours=6)
WORKERS = ("worker-a", "worker-b")
BACKFILL_TIMEOUT = 12 * 60
EVENT_TABLES = ("api_call", "payment_confirmed", "tokens_used")


@pytest.fixture
def redis_url() -> str:
    """Redis database 5 on the local server, flushed before and after; skips when Redis is down."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        pytest.skip(f"Celery scale-out test skipped: Redis at {REDIS_HOST}:{REDIS_PORT} did not answer PING "
                    f"({error}). Start a local Redis to run it.")
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    client.flushdb()
    client.close()


@pytest.fixture
def metadata_url(redis_url: str, pg_url: str) -> str:
    """A fresh PostgreSQL database for Airflow's metadata (and Celery results), dropped afterwards."""
    name = f"airflow_scaleout_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def airflow_env(home: Path, metadata_url: str, redis_url: str, api_port: int, config_path: Path,
                warehouse_url: str, orb_url: str) -> dict[str, str]:
    """The environment every Airflow process of the cluster shares."""
    import os

    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("AIRFLOW", "USAGE_BILLING"))}
    result_backend = sa.make_url(metadata_url).render_as_string(hide_password=False)
    async_conn = {}
    if importlib.util.find_spec("asyncpg") is None:
        # Airflow builds an async engine for a PostgreSQL metadata DB at start-up and needs asyncpg,
        # which requirements.lock does not hold yet. Nothing this test runs uses that engine (only
        # multi-team lookups and a few public REST routes do): an unused SQLite file stands in.
        async_conn = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"sqlite+aiosqlite:///{home}/unused-async.db"}
    return {
        **inherited,
        "AIRFLOW_HOME": str(home),
        "PYTHONPATH": f"{PROJECT / 'include'}:{PROJECT / 'plugins'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        **async_conn,
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{result_backend}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "2",
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex * 2,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # Only the backfill creates runs: no scheduled run for the latest interval on unpause.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "USAGE_BILLING_CONFIG": str(config_path),
        "AIRFLOW_CONN_SEGMENT_WAREHOUSE": warehouse_url,
        **connection_env("orb", orb_url),
    }


def test_backfill_spreads_over_two_celery_workers_and_delivers_each_event_once(
        redis_url, metadata_url, pg_url, pg_engine, schemas, tmp_path):
    schema, ledger_schema = schemas
    now = datetime.now(UTC)
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    first_hour = last_hour - timedelta(hours=RUNS)
    sample_data.generate(pg_engine, schema, start=first_hour - LOOKBACK, hours=RUNS + 6, events_per_hour=30,
                         seed=7, now=now)

    settings = config(schema, ledger_schema)
    del settings["destinations"]["kable"]  # an Orb-only setup: no segment_to_kable DAG to parse
    settings["airflow"] = {"partitions_per_table": 2, "max_active_tis_per_dag": 4, "retries": 0}
    config_path = tmp_path / "usage_billing.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    warehouse_url = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)

    started = time.monotonic()
    with Cluster(tmp_path / "logs", {}) as cluster:
        try:
            sandbox = cluster.start("sandbox", [
                __import__("sys").executable, "-m", "usage_billing.sandbox", "--orb-port", "0", "--kable-port", "-1",
                "--orb-api-key", ORB_KEY, "--grace-period-hours", "48"],
                env={"PYTHONPATH": f"{PROJECT / 'include'}"})
            orb_url = json.loads(cluster.wait_for_log(sandbox, '"orb_url"', timeout=30))["orb_url"]
            api_port = free_port()
            cluster.env = airflow_env(tmp_path / "airflow", metadata_url, redis_url, api_port, config_path,
                                      warehouse_url, orb_url)
            cluster.run("db", "migrate", timeout=300)
            print(f"db migrate done at {time.monotonic() - started:.0f} s")
            cluster.start_airflow("api-server")
            cluster.start_airflow("scheduler")
            cluster.start_airflow("dag-processor")
            workers = {}
            for name in WORKERS:
                workers[name] = cluster.start_airflow(
                    "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", "2",
                    name=name, env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
            metadata = sa.create_engine(metadata_url)
            wait_for_dag(cluster, metadata)
            for name, worker in workers.items():
                cluster.wait_for_log(worker, f"{name}@", timeout=120)
                cluster.wait_for_log(worker, " ready.", timeout=120)
            print(f"cluster up at {time.monotonic() - started:.0f} s")
            cluster.run("dags", "unpause", DAG_ID)
            cluster.run("backfill", "create", "--dag-id", DAG_ID,
                        "--from-date", first_hour.isoformat(),
                        "--to-date", (last_hour - timedelta(hours=1)).isoformat(),
                        "--max-active-runs", "4")
            runs = wait_for_backfill(cluster, metadata)
            print(f"backfill done at {time.monotonic() - started:.0f} s")
            assert sorted((r.data_interval_start, r.data_interval_end) for r in runs) == [
                (first_hour + timedelta(hours=h), first_hour + timedelta(hours=h + 1)) for h in range(RUNS)]
            assert {r.state for r in runs} == {"success"}, [(r.run_id, r.state) for r in runs]

            with metadata.connect() as conn:
                tis = conn.execute(sa.text(
                    "SELECT ti.task_id, ti.map_index, ti.run_id, ti.state, ti.hostname, ti.external_executor_id, "
                    "ti.try_number, ti.queued_by_job_id, ti.pid "
                    "FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id "
                    "WHERE dr.backfill_id IS NOT NULL AND ti.dag_id = :dag"), {"dag": DAG_ID}).all()
            for ti in tis[:10]:
                print(ti)
            print({ti.hostname for ti in tis})
            executed = executed_by_worker(workers)
            print({k: len(v) for k, v in executed.items()})
            assert 0
        except BaseException:
            print(f"\n=== cluster logs (failure after {time.monotonic() - started:.0f} s) ===\n"
                  f"{cluster.log_tails(60)}")
            raise


def wait_for_dag(cluster: Cluster, metadata: sa.Engine, timeout: float = 180) -> None:
    """Wait until the dag-processor has serialized the DAG; fail fast on an import error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_running()
        try:
            with metadata.connect() as conn:
                errors = conn.execute(sa.text("SELECT filename, stacktrace FROM import_error")).all()
                if errors:
                    raise ClusterError(f"DAG import errors: {errors}")
                if conn.execute(sa.text("SELECT 1 FROM serialized_dag WHERE dag_id = :d"), {"d": DAG_ID}).first():
                    return
        except sa.exc.ProgrammingError:
            pass
        time.sleep(1)
    raise ClusterError(f"{DAG_ID} was not parsed within {timeout} s")


def wait_for_backfill(cluster: Cluster, metadata: sa.Engine) -> list:
    """Wait until the backfill's runs all reached a terminal state; its runs."""
    deadline = time.monotonic() + BACKFILL_TIMEOUT
    runs: list = []
    while time.monotonic() < deadline:
        cluster.check_running()
        with metadata.connect() as conn:
            runs = conn.execute(sa.text(
                "SELECT dr.run_id, dr.state, dr.data_interval_start, dr.data_interval_end FROM dag_run dr "
                "JOIN backfill b ON b.id = dr.backfill_id WHERE b.dag_id = :d"), {"d": DAG_ID}).all()
        if len(runs) >= RUNS and all(r.state in ("success", "failed") for r in runs):
            return runs
        time.sleep(3)
    raise ClusterError(f"backfill not finished after {BACKFILL_TIMEOUT} s: {[(r.run_id, r.state) for r in runs]}")


EXECUTING = re.compile(r"\[([0-9a-f-]{36})\] Executing workload in Celery")


def executed_by_worker(workers: dict) -> dict[str, set[str]]:
    return {name: set(EXECUTING.findall(w.log.read_text(errors="replace"))) for name, w in workers.items()}
