"""The benchmark's as-run part: a real DAG run of ``segment_to_<destination>`` through Airflow.

``scripts/benchmark.py`` calls :func:`run_dag` once per measured run. Each run is
``airflow dags test segment_to_<destination> <logical date>`` in a child process of its own, with
its own ``AIRFLOW_HOME``, the benchmark's configuration file and the connections pointing at the
benchmark's PostgreSQL and sandbox, so it pays what a user pays: starting the interpreter, importing
Airflow, parsing the DAG files, the metadata database, the in-process Execution API, then ``plan``,
the mapped ``deliver`` tasks and ``report``, one after another.

Why ``airflow dags test`` and not a scheduler with a LocalExecutor: it is the one command that runs a
real DAG run (real task instances, XComs, the Execution API, the operators) without three long-lived
services (api-server, scheduler, dag-processor) competing for the machine's two cores, and it is
what a user types to try a window. Its cost model is a worker's plus a one-off start-up: a Celery
worker keeps the api-server and imports warm, so the start-up this reports is an upper bound of a
deployment's fixed cost per run.

Why SQLite for the metadata database: ``dags test`` runs every task in its one process, one after
another, so SQLite's single writer never waits, and the metadata database then adds no load to
the PostgreSQL server that holds the warehouse and the ledger (which would blur both figures). A
migrated database is made once per benchmark (not measured) and copied for each first run; a rerun
keeps its first run's database, as a deployment keeps its DAG registered.

Where the time goes is read from the run's own log lines (Airflow's structured timestamps: the DAG
bag fills, the dag run creation, each task's ``[DAG TEST] starting`` / ``Task started`` /
``::endgroup::`` / ``Post Execute`` / ``end task``), and the deliver tasks' stages from their XComs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z \[\s*(\w+)\s*\] (.*)")
START = re.compile(r"\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
END = re.compile(r"\[DAG TEST\] end task task_id=(\S+) map_index=(-?\d+)")


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp + "+00:00").timestamp()


@dataclass
class TaskTiming:
    """One task instance of the run: from ``[DAG TEST] starting`` to ``end task``."""

    task_id: str
    map_index: int
    started: float
    api_ready: float | None = None  # "Task started" (the Execution API took the task)
    execute_from: float | None = None  # the operator's execute() begins
    execute_to: float | None = None  # execute() returned
    ended: float | None = None

    @property
    def name(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"

    @property
    def execute(self) -> float:
        if self.execute_from is None or self.execute_to is None:
            return 0.0
        return self.execute_to - self.execute_from

    @property
    def total(self) -> float:
        return (self.ended or self.started) - self.started


@dataclass
class AirflowRun:
    """What one ``airflow dags test`` cost, and what its tasks reported."""

    label: str
    command: str = ""  # what was run, as the summary names it
    started_at: float = 0.0  # epoch seconds, just before the process was started
    returncode: int = 0
    seconds: float = 0.0  # process start -> the last task's end
    exit_seconds: float = 0.0  # process start -> the process exited
    peak_mb: float = 0.0  # ru_maxrss of the airflow process (the tasks run in it)
    cpu: float = 0.0
    first_line: float = 0.0  # seconds from start to the first DAG bag fill
    parse_seconds: float = 0.0
    parses: int = 0
    registered: float = 0.0  # the dag run exists (DAG sync + run creation done)
    tasks: list[TaskTiming] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    state: str = ""
    log: str = ""
    sandbox: tuple[int, int] = (0, 0)  # (requests, events) the sandbox answered 2xx during the run

    #: Timed from an API request to a running scheduler (SchedulerRun), not from a process start.
    scheduled = False

    @property
    def totals(self) -> Counter:
        total: Counter = Counter()
        for report in self.reports:
            total.update({k: v for k, v in report.items() if isinstance(v, int) and not isinstance(v, bool)})
        return total

    @property
    def stages(self) -> Counter:
        total: Counter = Counter()
        for report in self.reports:
            total.update(report.get("stages") or {})
        return total

    def execute_of(self, task_id: str) -> float:
        return sum(t.execute for t in self.tasks if t.task_id == task_id)

    @property
    def deliver_core(self) -> float:
        """The deliver tasks' own ``report.seconds`` (the core, as it timed itself)."""
        return sum(float(r.get("seconds") or 0.0) for r in self.reports)

    def breakdown(self) -> list[tuple[str, float]]:
        """Where the run's wall time went, in order; the rows add up to :attr:`seconds`."""
        rows: list[tuple[str, float]] = [
            ("process start, Python and Airflow imports (to the first DAG bag fill)", self.first_line),
            (f"DAG parsing ({self.parses} DAG bag fills of dags/)", self.parse_seconds),
        ]
        first_start = (self.tasks[0].started - self.started_at) if self.tasks else self.seconds
        rows.append(("metadata database: DAG sync, dag run creation", max(0.0, first_start - self.first_line
                                                                          - self.parse_seconds)))
        api = setup = finish = gaps = 0.0
        previous_end: float | None = None
        for index, task in enumerate(self.tasks):
            if previous_end is not None:
                gaps += max(0.0, task.started - previous_end)
            ready = task.execute_from if task.execute_from is not None else task.started
            if index == 0 and task.api_ready is not None:
                api += task.api_ready - task.started
                setup += ready - task.api_ready
            else:
                setup += ready - task.started
            if task.execute_to is not None and task.ended is not None:
                finish += task.ended - task.execute_to
            previous_end = task.ended
        rows.append(("in-process Execution API start (first task)", api))
        rows.append(("task start-up and finish: states, XCom, rendered fields (all tasks)", setup + finish))
        rows.append(("plan (execute)", self.execute_of("plan")))
        rows.append((f"deliver (execute, {sum(t.task_id == 'deliver' for t in self.tasks)} mapped tasks)",
                     self.execute_of("deliver")))
        rows.append(("report (execute)", self.execute_of("report")))
        rows.append(("between tasks (dags test's scheduling loop)", gaps))
        accounted = sum(seconds for _, seconds in rows)
        rows.append(("unaccounted", self.seconds - accounted))
        return rows


class AirflowHome:
    """A throwaway ``AIRFLOW_HOME`` with a migrated SQLite metadata database and the config file."""

    def __init__(self, root: Path, destination: str, settings: dict, database_url: str, partitions_per_table: int):
        self.root = root
        self.destination = destination
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.database_url = database_url
        self.partitions_per_table = partitions_per_table
        self.pristine = self.root / "pristine.db"
        self.secret = uuid.uuid4().hex * 2
        self.airflow = str(Path(sys.executable).with_name("airflow"))
        self._count = 0

    def environment(self, home: Path, ledger_schema: str, connection_env: dict[str, str]) -> dict[str, str]:
        """The child's whole Airflow environment: nothing of the benchmark process's leaks in."""
        import sqlalchemy as sa

        project = Path(__file__).resolve().parents[1]
        config = home / "usage_billing.yaml"
        settings = json.loads(json.dumps(self.settings))
        settings["ledger"]["schema"] = ledger_schema
        # A failing task fails the run now, not after Airflow's retry delay.
        settings["airflow"] = {"retries": 0, "partitions_per_table": self.partitions_per_table}
        config.write_text(json.dumps(settings, indent=2))  # JSON is YAML
        url = sa.make_url(self.database_url).set(drivername="postgresql")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("AIRFLOW", "USAGE_BILLING"))}
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(project / "plugins"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secret,
            "USAGE_BILLING_CONFIG": str(config),
            "AIRFLOW_CONN_SEGMENT_WAREHOUSE": url.render_as_string(hide_password=False),
            "PYTHONPATH": os.pathsep.join([str(project / "include"), str(project / "plugins")]),
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
            **connection_env,
        })
        return env

    def migrate(self) -> float:
        """Create the pristine metadata database once (setup, not measured); returns its seconds."""
        started = time.perf_counter()
        home = self.root / "migrate"
        home.mkdir(exist_ok=True)
        env = self.environment(home, "unused", {})
        subprocess.run([self.airflow, "db", "migrate"], env=env, cwd=home, check=True,  # noqa: S603
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.copy(home / "airflow.db", self.pristine)
        return time.perf_counter() - started

    def new_home(self) -> Path:
        """A fresh home holding a copy of the migrated database (for a first run)."""
        self._count += 1
        home = self.root / f"run{self._count}"
        home.mkdir()
        shutil.copy(self.pristine, home / "airflow.db")
        return home


def run_dag(home: Path, airflow_home: AirflowHome, ledger_schema: str, connection_env: dict[str, str],
            logical_date: datetime, label: str, timeout: float = 1800.0) -> AirflowRun:
    """``airflow dags test`` of one window in a child process; timed from just before it starts."""
    env = airflow_home.environment(home, ledger_schema, connection_env)
    log_path = home / f"dags-test-{int(time.time() * 1000)}.log"
    command = [airflow_home.airflow, "dags", "test", f"segment_to_{airflow_home.destination}",
               logical_date.isoformat()]
    result = AirflowRun(label, command=" ".join(["airflow", *command[1:]]), log=str(log_path))
    with open(log_path, "wb") as sink:
        started = result.started_at = time.time()
        process = subprocess.Popen(command, env=env, cwd=home, stdout=sink, stderr=subprocess.STDOUT)  # noqa: S603
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        exited = time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    result.returncode = process.returncode
    result.exit_seconds = exited - started
    result.peak_mb = usage.ru_maxrss / 1024
    result.cpu = usage.ru_utime + usage.ru_stime
    _read_log(log_path, started, result)
    _read_xcoms(home / "airflow.db", airflow_home.destination, result)
    return result


def _read_log(path: Path, started: float, result: AirflowRun) -> None:
    fill: float | None = None
    current: TaskTiming | None = None
    last_end = started
    for raw in path.read_text(errors="replace").splitlines():
        match = LINE.match(raw)
        if not match:
            continue
        moment, message = _epoch(match.group(1)), match.group(3)
        if message.startswith("Filling up the DagBag"):
            fill = moment
            if not result.parses:
                result.first_line = moment - started
        elif message.startswith("Bulk-writing dags to db") and fill is not None:
            result.parses += 1
            result.parse_seconds += moment - fill
            fill = None
        elif message.startswith("Created dag run."):
            result.registered = moment - started
        elif message.startswith("Marking run"):
            result.state = "success" if "successful" in message else "failed"
        elif found := START.search(message):
            current = TaskTiming(found.group(1), int(found.group(2)), moment)
            result.tasks.append(current)
        elif current is None:
            continue
        elif message.startswith("Task started") and current.api_ready is None:
            current.api_ready = moment
        elif message.startswith("::endgroup::") and current.execute_from is None and current.api_ready is not None:
            current.execute_from = moment
        elif message.startswith("::group::Post Execute") or (message.startswith("Task failed")
                                                              and current.execute_to is None):
            current.execute_to = moment
        elif END.search(message):
            current.ended = moment
            last_end = moment
            current = None
    result.seconds = last_end - started


def _read_xcoms(database: Path, destination: str, result: AirflowRun) -> None:
    """The deliver tasks' summaries (their XComs) of the newest run in the metadata database."""
    if not database.exists():
        return
    with sqlite3.connect(database) as conn:
        row = conn.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                           (f"segment_to_{destination}",)).fetchone()
        if row is None:
            return
        values = conn.execute("SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'deliver' "
                              "AND key = 'return_value' ORDER BY map_index", (f"segment_to_{destination}", row[0]))
        result.reports.extend(_deliver_reports(value for (value,) in values))



def _deliver_reports(values: Any) -> list[dict]:
    """The deliver tasks' summaries from their XCom values, as either metadata database returns them
    (a JSON column, JSON text, or a JSON string of JSON)."""
    reports = []
    for value in values:
        report: Any = json.loads(value) if isinstance(value, str | bytes) else value
        if isinstance(report, str):  # stored as a JSON string of JSON
            report = json.loads(report)
        if isinstance(report, dict):
            reports.append(report)
    return reports

# ------------------------------------------------------------------------------------------------
# The same DAG run under a scheduler: api-server, scheduler (LocalExecutor) and dag-processor
# ------------------------------------------------------------------------------------------------


@dataclass
class SchedulerRun(AirflowRun):
    """One DAG run under the scheduler, timed from the API request (trigger, or clear for the rerun) to
    the last task's end. The tasks' own start and end come from the metadata database; mapped
    ``deliver`` tasks run side by side, so a task's share of the run is the union of its intervals."""

    requested_at: float = 0.0
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    scheduled = True

    def execute_of(self, task_id: str) -> float:
        return _union(self.intervals.get(task_id, []))

    @property
    def deliver_core(self) -> float:
        return max((float(r.get("seconds") or 0.0) for r in self.reports), default=0.0)

    def breakdown(self) -> list[tuple[str, float]]:
        """Where the run's wall time went; the rows add up to :attr:`seconds`."""
        every = [span for spans in self.intervals.values() for span in spans]
        first = min((start for start, _ in every), default=self.requested_at)
        rows = [("request -> first task running (scheduler loop, executor, task process start)",
                 first - self.requested_at)]
        for task_id in ("gate", "plan", "deliver", "backfill", "report"):
            if task_id in self.intervals:
                count = len(self.intervals[task_id])
                label = f"{task_id} ({count} mapped tasks side by side, start to end)" if count > 1 else \
                    f"{task_id} (task start to end)"
                rows.append((label, self.execute_of(task_id)))
        rows.append(("between tasks (scheduler loop, executor queue, task process start)",
                     self.seconds - (first - self.requested_at) - _union(every)))
        return rows


def _union(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of ``spans``."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class SchedulerStack:
    """Airflow's three services with a LocalExecutor, started once per sandbox (not measured).

    Why a scheduler as well as ``airflow dags test``: it is how a deployment runs the DAG. Each task
    is a process of its own (forked by the executor's worker, which has Airflow imported already),
    the api-server that serves the Execution API is up before the run, and the mapped deliver tasks
    run side by side (``core.parallelism``). Its metadata database is PostgreSQL (a database of its
    own on the benchmark's server): the LocalExecutor refuses SQLite. Scheduled runs are off
    (``use_job_schedule``): only the benchmark's requests create runs.
    """

    def __init__(self, root: Path, airflow_home: AirflowHome, connection_env: dict[str, str], parallelism: int,
                 idle_sleep: float | None = None):
        self.root, self.airflow_home, self.connection_env = root, airflow_home, connection_env
        self.parallelism, self.idle_sleep = parallelism, idle_sleep
        self.root.mkdir(parents=True, exist_ok=True)
        self.dag_id = f"segment_to_{airflow_home.destination}"
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.env: dict[str, str] = {}
        self.url = ""
        self.token = ""
        self.metadata_url = ""

    def __enter__(self) -> SchedulerStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(self, ledger_schema: str) -> None:
        """Point the configuration file at ``ledger_schema``: each task process reads it when it runs."""
        self.airflow_home.environment(self.root, ledger_schema, self.connection_env)

    def start(self) -> None:
        import sqlalchemy as sa
        from airflow_local import LocalAirflow, free_port, psycopg2_url

        started = time.perf_counter()
        url = psycopg2_url(self.airflow_home.database_url)
        self.metadata_url = url.set(database=f"bench_airflow_{uuid.uuid4().hex[:8]}").render_as_string(False)
        LocalAirflow._create_database(sa.make_url(self.metadata_url))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **self.airflow_home.environment(self.root, "unused", self.connection_env),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # Parse the DAG files once at start-up, not every 30 s while the run is measured.
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3600",
        }
        if self.idle_sleep is not None:
            self.env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] = str(self.idle_sleep)
        subprocess.run([self.airflow_home.airflow, "db", "migrate"], env=self.env, cwd=self.root, check=True,  # noqa: S603
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for service in ("api-server", "scheduler", "dag-processor"):
            log = open(self.root / f"{service}.log", "ab")
            self.logs.append(log)
            self.processes.append(subprocess.Popen([self.airflow_home.airflow, service], env=self.env,  # noqa: S603
                                                   cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
        self._wait(lambda: self._get_token(), "the api-server")
        self._wait(lambda: self._api("GET", f"/api/v2/dags/{self.dag_id}", check=False).ok, "the DAG to be parsed")
        self._api("PATCH", f"/api/v2/dags/{self.dag_id}", json={"is_paused": False})
        self.start_seconds = time.perf_counter() - started

    def stop(self) -> None:
        import signal

        import sqlalchemy as sa
        from airflow_local import LocalAirflow, _signal_group

        for process in self.processes:
            _signal_group(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process.pid, signal.SIGKILL)  # what the group's leader left running
        self.processes.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()
        if self.metadata_url:
            LocalAirflow.drop_database(sa.make_url(self.metadata_url))
            self.metadata_url = ""

    def _get_token(self) -> bool:
        import requests

        try:
            answer = requests.get(f"{self.url}/auth/token", timeout=5)
        except requests.RequestException:
            return False
        if answer.ok:
            self.token = answer.json()["access_token"]
        return answer.ok

    def _api(self, method: str, path: str, check: bool = True, **kwargs: Any) -> Any:
        import requests

        answer = requests.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {self.token}"},
                                  timeout=30, **kwargs)
        if check and not answer.ok:
            raise RuntimeError(f"{method} {path}: HTTP {answer.status_code} {answer.text[:500]}")
        return answer

    def _wait(self, ready: Any, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[-1]} exited {process.returncode}; see {self.root}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what}: not ready within {timeout:.0f} s; see the logs in {self.root}")

    def run(self, logical_date: datetime, label: str, run_id: str, again: bool = False,
            timeout: float = 1800.0) -> SchedulerRun:
        """Trigger the run (``again``: clear it, as the UI's Clear does) and wait for it to finish."""
        path = f"/api/v2/dags/{self.dag_id}/dagRuns"
        command = f"POST {path}/{run_id}/clear" if again else f"POST {path} (logical date {logical_date.isoformat()})"
        result = SchedulerRun(label, command=f"{command}; scheduler, LocalExecutor, parallelism {self.parallelism}",
                              log=str(self.root))
        result.requested_at = result.started_at = time.time()
        if again:
            self._api("POST", f"{path}/{run_id}/clear", json={"dry_run": False})
        else:
            self._api("POST", path, json={"dag_run_id": run_id, "logical_date": logical_date.isoformat()})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self._api("GET", f"{path}/{run_id}").json()["state"]
            if state in ("success", "failed"):
                break
            time.sleep(0.1)
        result.state = state
        self._collect(run_id, result)
        return result

    def warm_up(self, logical_date: datetime, ledger_schema: str) -> float:
        """One run of an empty hour before anything is measured (not measured): the api-server builds
        its Execution API on the first task's request (3 s here), which a deployment's api-server did
        long before. Returns its seconds."""
        self.configure(ledger_schema)
        run_id = "benchmark_warm_up"
        run = self.run(logical_date, "warm-up", run_id)
        if run.state != "success":
            raise RuntimeError(f"the warm-up run of an empty hour ended {run.state}; see the logs in {self.root}")
        self.forget(run_id)
        return run.seconds

    def forget(self, run_id: str) -> None:
        """Delete the run, so the next round can trigger the same logical date again."""
        self._api("DELETE", f"/api/v2/dags/{self.dag_id}/dagRuns/{run_id}")

    def _collect(self, run_id: str, result: SchedulerRun) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.metadata_url)
        try:
            with engine.connect() as conn:
                tis = conn.execute(sa.text(
                    "SELECT task_id, map_index, start_date, end_date FROM task_instance WHERE dag_id = :d "
                    "AND run_id = :r AND start_date IS NOT NULL ORDER BY start_date"),
                    {"d": self.dag_id, "r": run_id}).all()
                values = conn.execute(sa.text(
                    "SELECT value FROM xcom WHERE dag_id = :d AND run_id = :r AND task_id = 'deliver' "
                    "AND key = 'return_value' ORDER BY map_index"), {"d": self.dag_id, "r": run_id}).scalars().all()
        finally:
            engine.dispose()
        last = result.requested_at
        for task_id, map_index, start, end in tis:
            begin, finish = start.timestamp(), (end or start).timestamp()
            result.intervals.setdefault(task_id, []).append((begin, finish))
            result.tasks.append(TaskTiming(task_id, map_index, begin, execute_from=begin, execute_to=finish,
                                           ended=finish))
            last = max(last, finish)
        result.seconds = last - result.requested_at
        result.exit_seconds = result.seconds
        result.reports.extend(_deliver_reports(values))
        result.peak_mb = max((float(r.get("peak_mb") or 0.0) for r in result.reports), default=0.0)
