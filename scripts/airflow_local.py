"""``make airflow``: a real local Airflow 3 with this project's DAGs, a sample warehouse and both sandboxes.

What it starts, each as its own process (its own session, so its whole tree stops together):

1. the Orb and Kable sandboxes (``python -m usage_billing.sandbox``), accepted events kept under
   ``<home>/sandbox`` so a restart remembers what they received;
2. ``airflow db migrate`` on a PostgreSQL metadata database (created if missing), then the
   api-server (UI and REST API), the scheduler (LocalExecutor) and the dag-processor.

Before that it loads sample Segment data (``usage_billing.sample_data``: three event tables, late,
duplicate and anonymous rows) into the warehouse database for the last hours, once: a second start
reuses it (``--fresh`` starts over: schemas, metadata database, sandbox state and ``<home>``).
Every connection the DAGs need is passed as an ``AIRFLOW_CONN_*`` variable; nothing is typed by hand.
It prints the UI's URL and the login, and stops everything on Ctrl-C (SIGINT) or SIGTERM.

Why the three services and not ``airflow standalone``: standalone also starts a triggerer this
project does not use, writes a generated password it prints only on the first start, and when sent
SIGTERM leaves its children running (its scheduler's workers had to be killed by PID). Started one
by one, each service gets its own log file (``<home>/logs/<service>.log``), its port chosen here, and
a stop by process group; the browser tests start exactly the same set through :class:`LocalAirflow`.

Why PostgreSQL, not SQLite, for both databases: the LocalExecutor runs several task processes at
once, all writing the ledger, and the scheduler, dag-processor and api-server all write the
metadata database; SQLite serialises every writer. The warehouse is ``$USAGE_BILLING_DATABASE_URL``
(default the test server); the metadata database is another database on the same server.

Every address is an option with an environment default (``python scripts/airflow_local.py --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Self

PROJECT = Path(__file__).resolve().parents[1]
for _path in (PROJECT / "include", PROJECT / "plugins"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import requests  # noqa: E402
import sqlalchemy as sa  # noqa: E402
import yaml  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
AIRFLOW = (sys.executable, "-m", "airflow")
SANDBOX_KEYS = {"orb": "local-orb-api-key", "kable_client": "kci_local", "kable": "local-kable-api-key"}


class LocalAirflowError(RuntimeError):
    """A step failed, or a process exited or did not become ready in time (the message has its log tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def psycopg2_url(url: str | sa.URL) -> sa.URL:
    """A PostgreSQL URL with the psycopg2 driver (SQLAlchemy 2.1's default, psycopg 3, is not installed)."""
    url = sa.make_url(url)
    if url.get_backend_name() != "postgresql":
        raise LocalAirflowError(f"{url.render_as_string()}: make airflow needs PostgreSQL (the LocalExecutor's "
                                f"task processes write the ledger at once; SQLite would serialise them)")
    return url.set(drivername="postgresql+psycopg2")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


@dataclass
class Options:
    """Where everything lives and listens; :func:`parse_arguments` fills it from flags and the environment."""

    home: Path = PROJECT / ".airflow"
    #: Warehouse and ledger (SQLAlchemy URL of a PostgreSQL database).
    database_url: str = DEFAULT_DATABASE_URL
    #: Airflow's metadata database; None: database ``usage_billing_airflow`` on the warehouse's server.
    metadata_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    #: 0 picks a free port.
    orb_port: int = 8101
    kable_port: int = 8102
    log_server_port: int = 8793
    username: str = "admin"
    #: None: generated once and kept in ``<home>/local.json``.
    password: str | None = None
    #: None: the shipped configuration's schemas (``source.schema``, ``ledger.schema``).
    source_schema: str | None = None
    ledger_schema: str | None = None
    hours: int = 6
    events_per_hour: int = 300
    fresh: bool = False
    #: Keep the sandboxes' accepted events across restarts.
    sandbox_state: bool = True
    #: Merged into the configuration file's ``airflow`` section (tests: no retries).
    airflow_settings: dict[str, Any] = field(default_factory=dict)
    #: Extra environment for every Airflow process (tests: no scheduled runs, slower re-parsing).
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Seconds allowed for each start-up step.
    timeout: float = 240


@dataclass
class Process:
    """One long-running process, the leader of its own process group, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    stream: IO[bytes]

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"


class LocalAirflow:
    """Sample warehouse, sandboxes and Airflow's three services; stops all it started on exit.

    ``with LocalAirflow(options) as local: ...``: on entry everything is up (the DAGs parsed), and
    :attr:`url`, :attr:`orb_url`, :attr:`kable_url`, :attr:`env`, :attr:`password` say where and how.
    """

    def __init__(self, options: Options):
        self.options = options
        self.home = options.home.resolve()
        self.database_url = psycopg2_url(options.database_url)
        self.logs = self.home / "logs"
        self.processes: list[Process] = []
        self.env: dict[str, str] = {}
        self.url = f"http://{options.host}:{options.port}"
        self.orb_url = self.kable_url = ""
        self.password = ""
        self.settings: Any = None
        self.sample: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._started = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Prepare the databases and files, then start the sandboxes and Airflow; returns once the DAGs are parsed."""
        self._prepare()
        self._start_sandboxes()
        self._mark("sandboxes up")
        self.env = self._airflow_env()
        self.cli_env = self.home / "env.sh"
        self.cli_env.write_text(cli_env_script(self.env))
        self.cli_env.chmod(0o600)
        self.run_airflow("db", "migrate")
        self._mark("db migrate")
        self._start_api_server()
        self._mark("api-server up")
        for service in ("scheduler", "dag-processor"):
            self._start(service, [*AIRFLOW, service])
        self.wait_for_dags(self.expected_dag_ids())
        self._mark("DAGs parsed")

    def stop(self, grace: float = 20) -> None:
        """SIGTERM every process group started, newest first; SIGKILL what is left after ``grace`` seconds."""
        running = [p for p in reversed(self.processes) if not p.stream.closed]
        for process in running:
            _signal_group(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            # The leader may be gone while children it spawned (same group) still live.
            while _signal_group(process.popen.pid, 0) and time.monotonic() < deadline:
                if process.popen.poll() is not None and not _group_alive(process.popen.pid):
                    break
                time.sleep(0.2)
        for process in running:
            _signal_group(process.popen.pid, signal.SIGKILL)
            try:
                process.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
                pass
            process.stream.close()

    # ------------------------------------------------------------------ preparation

    def _prepare(self) -> None:
        from usage_billing.settings import load_settings, parse_settings

        options = self.options
        if options.fresh:
            self._drop_everything(load_settings())
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        local = self._local_secrets()
        self.password = local["password"]
        config_path = self._config_file()
        self.settings = parse_settings(yaml.safe_load(config_path.read_text()))
        self.config_path = config_path
        self.metadata_url = psycopg2_url(options.metadata_url or self._default_metadata_url())
        self._create_database(self.metadata_url)
        self.sample = self._load_sample_data()
        self._mark("prepared")

    def _local_secrets(self) -> dict[str, str]:
        """The admin password and the JWT secret, kept in ``<home>/local.json`` so a restart keeps both."""
        path = self.home / "local.json"
        local = json.loads(path.read_text()) if path.exists() else {}
        local.setdefault("password", secrets.token_urlsafe(12))
        local.setdefault("jwt_secret", secrets.token_urlsafe(64))
        if self.options.password:
            local["password"] = self.options.password
        path.write_text(json.dumps(local))
        path.chmod(0o600)
        (self.home / "passwords.json").write_text(json.dumps({self.options.username: local["password"]}))
        (self.home / "passwords.json").chmod(0o600)
        return local

    def _config_file(self) -> Path:
        """The shipped configuration, or a copy of it with the schemas and ``airflow`` settings asked for."""
        options = self.options
        shipped = Path(os.environ.get("USAGE_BILLING_CONFIG") or PROJECT / "include" / "usage_billing.yaml")
        if not (options.source_schema or options.ledger_schema or options.airflow_settings):
            return shipped
        data = yaml.safe_load(shipped.read_text())
        if options.source_schema:
            data["source"]["schema"] = options.source_schema
        if options.ledger_schema:
            data.setdefault("ledger", {})["schema"] = options.ledger_schema
        data.setdefault("airflow", {}).update(options.airflow_settings)
        path = self.home / "usage_billing.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def _default_metadata_url(self) -> sa.URL:
        return self.database_url.set(database="usage_billing_airflow")

    @staticmethod
    def _create_database(url: sa.URL) -> None:
        url_ = psycopg2_url(url)
        admin = sa.create_engine(url_.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"),
                                    {"d": url_.database}).first():
                    conn.execute(sa.text(f'CREATE DATABASE "{url_.database}"'))
        except sa.exc.OperationalError as error:
            raise LocalAirflowError(f"PostgreSQL at {url_.render_as_string()} is not reachable ({error.orig}); start "
                                    f"it or set USAGE_BILLING_DATABASE_URL") from None
        finally:
            admin.dispose()

    @staticmethod
    def drop_database(url: str | sa.URL) -> None:
        """Drop a metadata database (the tests' throwaway ones, ``--fresh``)."""
        url_ = psycopg2_url(url)
        admin = sa.create_engine(url_.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url_.database}" WITH (FORCE)'))
        finally:
            admin.dispose()

    def _drop_everything(self, shipped_settings: Any) -> None:
        source = self.options.source_schema or shipped_settings.source.schema_
        ledger = self.options.ledger_schema or shipped_settings.ledger.schema_
        engine = sa.create_engine(self.database_url)
        try:
            with engine.begin() as conn:
                for schema in (source, ledger):
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            engine.dispose()
        self.drop_database(self.options.metadata_url or self._default_metadata_url())
        shutil.rmtree(self.home, ignore_errors=True)

    def _load_sample_data(self) -> dict[str, Any]:
        """Sample Segment rows for the last ``hours`` hours (plus the lookback), unless the tables exist."""
        from usage_billing import sample_data
        from usage_billing.sources.postgres import create_engine
        from usage_billing.sources.postgres.reader import table_columns

        source = self.settings.source
        engine = create_engine(self.database_url)
        marker = self.home / "sample.json"
        try:
            with engine.connect() as conn:
                present = all(table_columns(conn, source.schema_, table) is not None for table in source.events)
            if present and marker.exists():
                return {**json.loads(marker.read_text()), "reused": True}
            now = datetime.now(UTC)
            last_hour = now.replace(minute=0, second=0, microsecond=0)
            first_hour = last_hour - timedelta(hours=self.options.hours)
            lookback_hours = int(source.lookback.total_seconds() // 3600)
            stats = sample_data.generate(engine, source.schema_, sample_data.Sample(
                start=first_hour - source.lookback, hours=self.options.hours + lookback_hours,
                events_per_hour=self.options.events_per_hour, seed=7, now=now))
        finally:
            engine.dispose()
        sample = {"first_hour": first_hour.isoformat(), "last_hour": last_hour.isoformat(), "rows": stats.rows,
                  "duplicates": stats.duplicates, "anonymous": stats.anonymous, "late": stats.late}
        marker.write_text(json.dumps(sample))
        return {**sample, "reused": False}

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> Process:
        log = self.logs / f"{name}.log"
        stream = log.open("ab")
        popen = subprocess.Popen(list(command), env={**(env or self.env)}, stdin=subprocess.DEVNULL,  # noqa: S603
                                 stdout=stream, stderr=subprocess.STDOUT, start_new_session=True, cwd=PROJECT)
        process = Process(name, popen, log, stream)
        self.processes.append(process)
        return process

    def run_airflow(self, *args: str, timeout: float | None = None) -> str:
        """``airflow <args>`` to completion in the services' environment; its output."""
        popen = subprocess.Popen([*AIRFLOW, *args], env=self.env, stdin=subprocess.DEVNULL,  # noqa: S603
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=PROJECT)
        try:
            output, _ = popen.communicate(timeout=timeout or self.options.timeout)
        except BaseException:  # timeout, Ctrl-C: leave nothing behind
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        if popen.returncode != 0:
            raise LocalAirflowError(f"airflow {' '.join(args)} exited {popen.returncode}:\n{output[-4000:]}")
        return output

    def check_running(self) -> None:
        """Raise LocalAirflowError, with its log tail, if a started process has exited."""
        for process in self.processes:
            if not process.stream.closed and process.popen.poll() is not None:
                raise LocalAirflowError(f"{process.name} exited with code {process.popen.returncode}; the tail of "
                                        f"{process.log}:\n{process.tail()}")

    def _wait(self, what: str, ready: Any, timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or self.options.timeout)
        while time.monotonic() < deadline:
            self.check_running()
            result = ready()
            if result:
                return result
            time.sleep(0.5)
        raise LocalAirflowError(f"{what}: not ready within {timeout or self.options.timeout} s\n{self.log_tails()}")

    def _start_sandboxes(self) -> None:
        options = self.options
        command = [sys.executable, "-m", "usage_billing.sandbox", "--orb-port", str(options.orb_port),
                   "--kable-port", str(options.kable_port), "--orb-api-key", SANDBOX_KEYS["orb"],
                   "--kable-client-id", SANDBOX_KEYS["kable_client"], "--kable-api-key", SANDBOX_KEYS["kable"]]
        if options.sandbox_state:
            command += ["--state-dir", str(self.home / "sandbox")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "include"), str(PROJECT / "plugins")])}
        sandbox = self._start("sandbox", command, env)

        def announced() -> dict | None:
            for line in sandbox.log.read_text(errors="replace").splitlines():
                if line.startswith('{"orb_url"'):
                    return json.loads(line)
            if "address already in use" in sandbox.log.read_text(errors="replace").lower():
                raise LocalAirflowError(f"a sandbox port is taken (Orb {options.orb_port}, Kable "
                                        f"{options.kable_port}): set USAGE_BILLING_ORB_PORT / USAGE_BILLING_KABLE_PORT "
                                        f"(0 = any free port)")
            return None

        urls = self._wait("sandboxes", announced, 60)
        self.orb_url, self.kable_url = urls["orb_url"], urls["kable_url"]

    def _airflow_env(self) -> dict[str, str]:
        """The environment of every Airflow process: settings, connections, the configuration file."""
        options = self.options
        local = json.loads((self.home / "local.json").read_text())
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "USAGE_BILLING"))}
        warehouse = self.database_url.set(drivername="postgresql")
        return {
            **inherited,
            "AIRFLOW_HOME": str(self.home),
            "PYTHONPATH": os.pathsep.join([str(PROJECT / "include"), str(PROJECT / "plugins")]),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # LocalExecutor starts this many worker processes up front; 4 suits a 2-core laptop.
            "AIRFLOW__CORE__PARALLELISM": "4",
            # As docker-compose.yaml: shorter waits between a run's tasks (README, Performance).
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{options.username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url.render_as_string(False),
            "AIRFLOW__API__HOST": options.host,
            "AIRFLOW__API__PORT": str(options.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{options.port}/execution/",
            # Task processes call the api-server; on a busy 2-core machine 5 s (the default) is tight.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            "AIRFLOW__API_AUTH__JWT_SECRET": local["jwt_secret"],
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(options.log_server_port),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "USAGE_BILLING_CONFIG": str(self.config_path),
            "AIRFLOW_CONN_SEGMENT_WAREHOUSE": warehouse.render_as_string(False),
            "AIRFLOW_CONN_ORB_DEFAULT": json.dumps({"conn_type": "http", "host": self.orb_url,
                                                    "password": SANDBOX_KEYS["orb"]}),
            "AIRFLOW_CONN_KABLE_DEFAULT": json.dumps({"conn_type": "http", "host": self.kable_url,
                                                      "login": SANDBOX_KEYS["kable_client"],
                                                      "password": SANDBOX_KEYS["kable"]}),
            **options.extra_env,
        }

    def _start_api_server(self) -> None:
        try:
            with socket.create_connection((self.options.host, self.options.port), timeout=1):
                raise LocalAirflowError(f"port {self.options.port} on {self.options.host} is taken: stop what "
                                        f"listens there or set USAGE_BILLING_AIRFLOW_PORT")
        except OSError:
            pass
        self._start("api-server", [*AIRFLOW, "api-server"])

        def answers() -> bool:
            try:
                return all(requests.get(f"{self.url}{path}", timeout=5).ok
                           for path in ("/api/v2/monitor/health", "/execution/health"))
            except requests.RequestException:
                return False

        self._wait("api-server", answers)

    def expected_dag_ids(self) -> list[str]:
        from billing_airflow.operators.run_request import MODES, REPLACE, dag_id_for
        from usage_billing.destinations import DESTINATIONS

        destinations = self.settings.configured_destinations()
        return [dag_id_for(d, mode) for d in destinations for mode in MODES
                if mode != REPLACE or DESTINATIONS[d].capabilities.backfills]

    def wait_for_dags(self, dag_ids: Sequence[str]) -> None:
        """Until the dag-processor has serialized every DAG in ``dag_ids``; at once on an import error."""
        engine = sa.create_engine(self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])

        def parsed() -> bool:
            with engine.connect() as conn:
                errors = conn.execute(sa.text("SELECT filename, stacktrace FROM import_error")).all()
                if errors:
                    raise LocalAirflowError(f"DAG import errors: {errors}")
                found = {r[0] for r in conn.execute(sa.text("SELECT dag_id FROM serialized_dag"))}
            return set(dag_ids) <= found

        try:
            self._wait("dag-processor", parsed)
        finally:
            engine.dispose()

    # ------------------------------------------------------------------ reporting

    def _mark(self, step: str) -> None:
        self.timings[step] = round(time.monotonic() - self._started, 1)

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"----- {p.name} ({p.log}) -----\n{p.tail(lines)}" for p in self.processes)

    def banner(self) -> str:
        settings, sample = self.settings, self.sample
        dags = ", ".join(self.expected_dag_ids())
        data = (f"reused from an earlier start ({sample['rows']} rows)" if sample.get("reused") else
                f"{sample['rows']} Segment rows ({sample['duplicates']} duplicates, {sample['anonymous']} anonymous, "
                f"{sample['late']} loaded late)")
        database = self.database_url.render_as_string()
        return "\n".join([
            "",
            f"Airflow is up in {self.timings.get('DAGs parsed', 0):.0f} s:  {self.url}",
            f"  login:      {self.options.username} / {self.password}",
            f"  DAGs:       {dags}",
            "              paused at first: Trigger -> Backfill unpauses the DAG (ticked by default), or turn it on",
            f"  warehouse:  {database}, schema {settings.source.schema_}: {data}; hours to backfill "
            f"{sample['first_hour'][:16]} .. {sample['last_hour'][:16]} UTC",
            f"  ledger:     {database}, schema {settings.ledger.schema_}",
            f"  sandboxes:  Orb {self.orb_url}, Kable {self.kable_url} (what they received: <url>/_sandbox/events)",
            f"  metadata:   {self.metadata_url.render_as_string()}",
            f"  logs:       {self.logs}/<service>.log; task logs under {self.logs}/dag_id=...",
            f"  CLI:        . {_shown(self.cli_env)}   (then `airflow ...` in that shell reaches this Airflow)",
            "Ctrl-C stops everything.",
        ])


def cli_env_script(env: Mapping[str, str]) -> str:
    """Shell lines giving a terminal the services' environment (``. <home>/env.sh``): Airflow's settings and
    connections, the configuration file, PYTHONPATH, and this environment's ``bin`` first on PATH, so that
    ``airflow dags trigger ...`` typed there acts on this Airflow's metadata database, as the services do."""
    lines = ["# Written by make airflow: `. <this file>`, then `airflow ...` in that shell reaches the local Airflow.",
             f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())
              if name.startswith(("AIRFLOW", "USAGE_BILLING")) or name == "PYTHONPATH"]
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (what a user types)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _group_alive(pgid: int) -> bool:
    return _signal_group(pgid, 0)


def parse_arguments(argv: Sequence[str] | None = None) -> Options:
    """Flags, each with an environment variable as its default."""
    env = os.environ
    parser = argparse.ArgumentParser(prog="make airflow", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(env.get("USAGE_BILLING_AIRFLOW_HOME", PROJECT / ".airflow")),
                        help="AIRFLOW_HOME, logs and local state ($USAGE_BILLING_AIRFLOW_HOME, default .airflow)")
    parser.add_argument("--database-url", default=env.get("USAGE_BILLING_DATABASE_URL", DEFAULT_DATABASE_URL),
                        help="PostgreSQL of the sample warehouse and the ledger ($USAGE_BILLING_DATABASE_URL)")
    parser.add_argument("--metadata-url", default=env.get("USAGE_BILLING_AIRFLOW_DATABASE_URL"),
                        help="Airflow's metadata database ($USAGE_BILLING_AIRFLOW_DATABASE_URL; default database "
                             "usage_billing_airflow on the warehouse's server, created if missing)")
    parser.add_argument("--host", default=env.get("USAGE_BILLING_AIRFLOW_HOST", "127.0.0.1"),
                        help="address of the UI ($USAGE_BILLING_AIRFLOW_HOST)")
    parser.add_argument("--port", type=int, default=_env_int("USAGE_BILLING_AIRFLOW_PORT", 8080),
                        help="port of the UI and API ($USAGE_BILLING_AIRFLOW_PORT, default 8080)")
    parser.add_argument("--orb-port", type=int, default=_env_int("USAGE_BILLING_ORB_PORT", 8101),
                        help="Orb sandbox port ($USAGE_BILLING_ORB_PORT; 0 = any free port)")
    parser.add_argument("--kable-port", type=int, default=_env_int("USAGE_BILLING_KABLE_PORT", 8102),
                        help="Kable sandbox port ($USAGE_BILLING_KABLE_PORT; 0 = any free port)")
    parser.add_argument("--log-server-port", type=int, default=_env_int("USAGE_BILLING_LOG_SERVER_PORT", 8793),
                        help="the scheduler's task-log server ($USAGE_BILLING_LOG_SERVER_PORT)")
    parser.add_argument("--username", default=env.get("USAGE_BILLING_AIRFLOW_USER", "admin"))
    parser.add_argument("--password", default=env.get("USAGE_BILLING_AIRFLOW_PASSWORD"),
                        help="default: generated on the first start and kept in <home>/local.json")
    parser.add_argument("--hours", type=int, default=6, help="hours of sample data before now (plus the lookback)")
    parser.add_argument("--events-per-hour", type=int, default=300, help="sample events per hour and event type")
    parser.add_argument("--fresh", action="store_true",
                        help="drop the sample schemas, the ledger, the metadata database and <home> first")
    args = parser.parse_args(argv)
    return Options(home=args.home, database_url=args.database_url, metadata_url=args.metadata_url, host=args.host,
                   port=args.port, orb_port=args.orb_port, kable_port=args.kable_port,
                   log_server_port=args.log_server_port, username=args.username, password=args.password,
                   hours=args.hours, events_per_hour=args.events_per_hour, fresh=args.fresh)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)

    def on_signal(_number: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C even when started from a shell that had SIGINT ignored; SIGTERM and a closed terminal alike.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    print(f"starting a local Airflow in {options.home} (service logs: {options.home / 'logs'}) ...", flush=True)
    try:
        local = LocalAirflow(options)
    except LocalAirflowError as error:
        print(f"make airflow: {error}", file=sys.stderr)
        return 2
    code = 0
    try:
        local.start()
        print(local.banner(), flush=True)
        while True:
            local.check_running()
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping the api-server, scheduler, dag-processor and sandboxes ...", flush=True)
    except LocalAirflowError as error:
        print(f"\nmake airflow failed: {error}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # A second Ctrl-C must not cut the stop short and leave processes behind.
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_IGN)
        local.stop()
    print("stopped.")
    return code


if __name__ == "__main__":
    sys.exit(main())
