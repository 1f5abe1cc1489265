"""A real Airflow (api-server, scheduler, dag-processor) and a real Chromium, shared by the browser tests.

The Airflow side is ``scripts/airflow_local.py``'s :class:`LocalAirflow`, the code behind ``make
airflow``, pointed at throwaway schemas and a throwaway metadata database in the test PostgreSQL, on
ports picked at random, with the sandboxes in memory. Chromium is Debian's package (``/usr/bin/chromium``,
or ``$CHROMIUM``), driven by Playwright's sync API; Playwright's own browser download is never used.

The tests only perform workflows through the UI. They read the metadata database to wait for runs to
finish, and the sandboxes and the ledger to check what was delivered.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from scripts.airflow_local import LocalAirflow, Options, free_port
from tests.conftest import TEST_DATABASE_URL

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
HOURS = 3
LOOKBACK = timedelta(hours=6)  # source.lookback of the shipped configuration
EVENT_TABLES = ("api_call", "payment_confirmed", "tokens_used")
#: airflow.delivery_deadline of the stack's hourly DAGs.
DELIVERY_DEADLINE = timedelta(hours=1)
#: Longest wait for a run or a backfill; a healthy one takes well under a minute here.
RUN_TIMEOUT = 240


def _chromium_or_skip() -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need Chromium: {CHROMIUM} does not exist. Install Debian's package with "
                    f"`apt-get install -y chromium` (Playwright's own browser download does not work offline), "
                    f"or point $CHROMIUM at a Chromium binary")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:  # pragma: no cover - it is in requirements.lock
        pytest.skip("browser tests need the playwright package: make test installs it from requirements.lock")
    return CHROMIUM


@dataclass
class Stack:
    """What the tests drive and check: the running Airflow, its databases and the sample's hours."""

    local: LocalAirflow
    metadata: sa.Engine
    warehouse: sa.Engine
    schema: str
    ledger_schema: str
    first_hour: datetime
    last_hour: datetime

    @property
    def url(self) -> str:
        return self.local.url

    # -- sandboxes ---------------------------------------------------------------------------

    def sandbox(self, name: str) -> dict:
        """``GET /_sandbox/events``: accepted events, duplicate count, request count, Orb backfills."""
        url = self.local.orb_url if name == "orb" else self.local.kable_url
        return requests.get(f"{url}/_sandbox/events", timeout=30).json()

    # -- warehouse and ledger ----------------------------------------------------------------

    def warehouse_ids(self, start: datetime, end: datetime, deliverable: bool, tables=EVENT_TABLES,
                      column: str = "received_at") -> set[str]:
        """Ids whose ``column`` (load time by default) lies in ``[start, end)``, with a customer or without."""
        condition = "user_id IS NOT NULL AND trim(user_id) <> ''"
        ids: set[str] = set()
        with self.warehouse.connect() as conn:
            for table in tables:
                rows = conn.execute(sa.text(
                    f'SELECT id FROM "{self.schema}".{table} WHERE "{column}" >= :s AND "{column}" < :e '
                    f"AND {'' if deliverable else 'NOT '}({condition})"), {"s": start, "e": end})
                ids.update(r[0] for r in rows)
        return ids

    def ledger_rows(self, destination: str = "orb", where: str = "TRUE", **params) -> list[dict]:
        with self.warehouse.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(
                f'SELECT * FROM "{self.ledger_schema}".deliveries WHERE destination = :d AND {where}'),
                {"d": destination, **params})]

    def ledger_keys(self, destination: str = "orb") -> dict[str, set[str]]:
        by_status: dict[str, set[str]] = {}
        for row in self.ledger_rows(destination):
            by_status.setdefault(row["status"], set()).add(row["idempotency_key"])
        return by_status

    # -- Airflow state (read only: the workflows themselves go through the UI) ----------------

    def runs(self, dag_id: str) -> list:
        with self.metadata.connect() as conn:
            return conn.execute(sa.text(
                "SELECT run_id, state, run_type, backfill_id, data_interval_start, data_interval_end, conf, "
                "logical_date FROM dag_run WHERE dag_id = :d ORDER BY id"), {"d": dag_id}).all()

    def task_instances(self, dag_id: str, run_id: str) -> list:
        with self.metadata.connect() as conn:
            return conn.execute(sa.text(
                "SELECT task_id, map_index, state, rendered_map_index, try_number FROM task_instance "
                "WHERE dag_id = :d AND run_id = :r ORDER BY task_id, map_index"), {"d": dag_id, "r": run_id}).all()

    def wait_for_runs(self, dag_id: str, count: int, backfill: bool | None = None,
                      since: int = 0) -> list:
        """Wait until the DAG has ``count`` runs after the first ``since`` (of the kind asked), all finished."""
        deadline = time.monotonic() + RUN_TIMEOUT
        runs: list = []
        while time.monotonic() < deadline:
            self.local.check_running()
            runs = self.runs(dag_id)[since:]
            if backfill is not None:
                runs = [r for r in runs if (r.backfill_id is not None) == backfill]
            if len(runs) >= count and all(r.state in ("success", "failed") for r in runs):
                return runs
            time.sleep(1)
        raise AssertionError(f"{dag_id}: {count} finished runs expected within {RUN_TIMEOUT} s, got "
                             f"{[(r.run_id, r.state) for r in runs]}\n{self.local.log_tails(20)}")

    def wait_for_backfills_to_complete(self, dag_id: str) -> None:
        """The scheduler marks a backfill complete a loop after its last run; until then the form refuses
        another one ("There is already a running backfill")."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            self.local.check_running()
            with self.metadata.connect() as conn:
                if not conn.execute(sa.text("SELECT 1 FROM backfill WHERE dag_id = :d AND completed_at IS NULL"),
                                    {"d": dag_id}).first():
                    return
            time.sleep(1)
        raise AssertionError(f"{dag_id}: a backfill is still not complete after {RUN_TIMEOUT} s")

    def wait_for_tries(self, dag_id: str, tries: int) -> list:
        """Wait until every task instance of the DAG has run ``tries`` times and finished; them all.

        A task a branch skipped never runs (the approval of a run too small to need one): it counts as done."""
        deadline = time.monotonic() + RUN_TIMEOUT
        tis: list = []
        while time.monotonic() < deadline:
            self.local.check_running()
            tis = [ti for run in self.runs(dag_id) for ti in self.task_instances(dag_id, run.run_id)]
            if tis and all(ti.state == "skipped" or (ti.try_number >= tries and ti.state in ("success", "failed"))
                           for ti in tis):
                return tis
            time.sleep(1)
        raise AssertionError(f"{dag_id}: not every task ran {tries} times within {RUN_TIMEOUT} s: "
                             f"{[(ti.task_id, ti.map_index, ti.state, ti.try_number) for ti in tis]}")

    def task_log(self, dag_id: str, run_id: str, task_id: str) -> str:
        """The task's log files as written by the worker (every try, mapped indexes included)."""
        paths = sorted(self.local.logs.glob(f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/**/*.log"))
        return "\n".join(path.read_text(errors="replace") for path in paths)

    def task_errors(self, dag_id: str) -> str:
        """The error lines of the DAG's task logs, for an assertion message."""
        out = []
        for path in sorted((self.local.logs).glob(f"dag_id={dag_id}/**/*.log")):
            errors = [line[:1500] for line in path.read_text(errors="replace").splitlines()
                      if '"level":"error"' in line]
            if errors:
                out.append(f"--- {path.name}\n" + "\n".join(errors[-5:]))
        return "\n".join(out) or "(no error line in the task logs)"


@pytest.fixture(scope="session")
def chromium() -> str:
    return _chromium_or_skip()


@pytest.fixture(scope="session")
def stack(chromium, tmp_path_factory) -> Iterator[Stack]:
    """Sample warehouse, sandboxes and Airflow's three services, up for the whole browser session."""
    suffix = uuid.uuid4().hex[:10]
    schema, ledger_schema = f"src_ui_{suffix}", f"ledger_ui_{suffix}"
    metadata_url = sa.make_url(TEST_DATABASE_URL).set(database=f"airflow_ui_{suffix}")
    options = Options(
        home=tmp_path_factory.mktemp("airflow-ui"), database_url=TEST_DATABASE_URL,
        metadata_url=metadata_url.render_as_string(False), port=free_port(), orb_port=0, kable_port=0,
        log_server_port=free_port(), password="browser-test-password", source_schema=schema,
        ledger_schema=ledger_schema, hours=HOURS, events_per_hour=30, sandbox_state=False,
        # A failure shows at once instead of after Airflow's retry delay; every hourly run carries a
        # deadline (a backfill's hours miss it at once: test_ui_workflows checks the scheduler ran it).
        airflow_settings={"retries": 0, "delivery_deadline": f"{int(DELIVERY_DEADLINE.total_seconds())}s"},
        extra_env={
            # Only the UI creates runs: unpausing must not add a scheduled run for the latest hour.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # Parse each DAG file once: the CPU goes to the tasks and the browser.
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        },
        timeout=300,
    )
    local = LocalAirflow(options)
    warehouse = sa.create_engine(TEST_DATABASE_URL)
    try:
        with local:
            metadata = sa.create_engine(local.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
            try:
                yield Stack(local, metadata, warehouse, schema, ledger_schema,
                            datetime.fromisoformat(local.sample["first_hour"]),
                            datetime.fromisoformat(local.sample["last_hour"]))
            finally:
                metadata.dispose()
    finally:
        with warehouse.begin() as conn:
            for name in (schema, ledger_schema):
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        warehouse.dispose()
        LocalAirflow.drop_database(metadata_url)
        print(f"\nbrowser stack timings (s): {json.dumps(local.timings)}")


@pytest.fixture(scope="session")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def signed_in(browser, stack, tmp_path_factory) -> Path:
    """Sign in through Airflow's login page once; the session's cookies, for every page."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{stack.url}/")
    page.wait_for_url("**/auth/login**")  # the UI is behind Airflow's authentication
    page.get_by_label("Username").fill(stack.local.options.username)
    page.get_by_label("Password").fill(stack.local.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)
    page.wait_for_load_state("networkidle")
    state = tmp_path_factory.mktemp("browser") / "state.json"
    context.storage_state(path=str(state))
    context.close()
    return state


@pytest.fixture
def page(browser, signed_in, request):
    """A signed-in page; its screenshot is kept in the test's tmp dir when the test fails."""
    context = browser.new_context(storage_state=str(signed_in), viewport={"width": 1400, "height": 1000},
                                  timezone_id="UTC")
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        path = Path(os.environ.get("BROWSER_SCREENSHOTS", "/tmp")) / f"{request.node.name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the failed page: {path}")
    context.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
