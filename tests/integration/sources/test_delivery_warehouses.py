"""Delivery conformance on each warehouse source: the PostgreSQL delivery cases, with the source in
Snowflake (fakesnow server), BigQuery (bqemulator) or Redshift-dialect SQL (on PostgreSQL) and the ledger
in its own PostgreSQL schema, through the real hooks to the Orb and Kable sandboxes.

EMULATED: what these prove is the product's side of the contract — the source and ledger wiring
(``open_warehouse``: source by the connection's type, ledger on a postgres connection), the per-chunk
batched ledger lookup that replaces the in-database anti-join, exactly-once under reruns, late loads and a
killed task — not the warehouses' own behaviour, speed or cost (see conftest and the README).

The same invariant as ``tests/integration/test_delivery.py``: every deliverable event accepted once,
every other one rejected with a reason in the ledger, nothing pending, a rerun sends nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import PROJECT
from tests.integration.conftest import config, connection_env, start_sandbox
from tests.integration.sources.conftest import Warehouse, emulated_warehouse
from usage_billing import sample_data
from usage_billing.delivery import DeliveryJob, deliver_window
from usage_billing.destinations import get_destination
from usage_billing.ledger import Ledger, RunRef
from usage_billing.sandbox import ServerOptions
from usage_billing.settings import parse_settings
from usage_billing.sources import Partition, Window

TABLES = ("api_call", "payment_confirmed", "tokens_used")
LEDGER_CONN = "billing_ledger"
CHUNK = 100  # several chunks per table, so several batched ledger lookups per window
# What each warehouse's summary line must show of what it reported (base.QueryCost.render).
COST_SHOWS = {"snowflake": "query ids", "bigquery": "MB processed", "redshift": "rows scanned"}


@pytest.fixture(params=["snowflake", "bigquery", "redshift"])
def warehouse(request, schemas, pg_url, monkeypatch) -> Warehouse:
    return emulated_warehouse(request.param, request, schemas[0], pg_url, monkeypatch)


@dataclass
class WarehouseWorld:
    """A warehouse loaded with the sample rows, the ledger in PostgreSQL, a sandbox, and the settings a
    task would read (source.conn_id = the warehouse's connection, ledger.conn_id = a postgres one)."""

    warehouse: Warehouse
    name: str
    sandbox: Any
    settings: Any
    ledger: Ledger
    rows: dict[str, list[dict]]
    config: dict
    lookups: list[int] = field(default_factory=list)

    def add(self, rows: Mapping[str, Sequence[dict]]) -> None:
        self.warehouse.load(rows)
        for table, batch in rows.items():
            self.rows[table].extend(batch)

    def ids(self, deliverable: bool, before: datetime | None = None) -> set[str]:
        """Ids loaded (by the loaded-at column) before ``before``: with a customer, or without one."""
        return {row["id"] for batch in self.rows.values() for row in batch
                if bool(row["user_id"] and row["user_id"].strip()) == deliverable
                and (before is None or self.warehouse.loaded_at(row) < before)}

    def ledger_keys(self, status: str) -> set[str]:
        with self.ledger.engine.connect() as conn:
            rows = conn.execute(sa.select(self.ledger.table.c.idempotency_key).where(
                self.ledger.table.c.destination == self.name, self.ledger.table.c.status == status))
            return {r[0] for r in rows}

    def deliver(self, window: Window, run: str = "run-1") -> list:
        """What one deliver task per event table does: connections opened by the operator's code."""
        from billing_airflow.operators.deliver import hook_class, open_warehouse

        destination = get_destination(self.name, self.settings)
        reports = []
        for table in TABLES:
            with open_warehouse(self.settings) as (source, ledger), \
                    hook_class(self.name)(destination.settings.conn_id, destination.settings) as hook:
                known_keys = ledger.known_keys

                def counted(name, keys, retry, loaded_at=None, _known=known_keys):
                    self.lookups.append(len(keys))
                    return _known(name, keys, retry, loaded_at)

                ledger.known_keys = counted
                job = DeliveryJob.from_settings(self.settings, destination, source, ledger, hook,
                                                RunRef("warehouse_test", run))
                assert job.ledger_join is False, "a warehouse never joins the ledger"
                reports.append(deliver_window(job, Partition(table), window))
        return reports


def world_config(warehouse: Warehouse, ledger_schema: str, name: str, **overrides) -> dict:
    settings = config(warehouse.schema, ledger_schema, **overrides)
    settings["source"].update(conn_id=warehouse.conn_id, loaded_at_column=warehouse.loaded_at_column,
                              chunk_size=CHUNK)
    settings["ledger"] = {"conn_id": LEDGER_CONN, "schema": ledger_schema}
    return settings


def make_world(name: str, warehouse: Warehouse, schemas, pg_url, pg_engine, monkeypatch, start: datetime,
               now: datetime, sandbox_options: dict | None = None,
               destination_overrides: dict | None = None) -> Iterator[WarehouseWorld]:
    monkeypatch.setenv(f"AIRFLOW_CONN_{LEDGER_CONN.upper()}",
                       sa.make_url(pg_url).set(drivername="postgresql").render_as_string(False))
    # The same rows as the PostgreSQL world (tests/integration/conftest.make_world): seed 11, 60 an hour.
    rows = sample_data.generate_rows(sample_data.Sample(start, 3, 60, seed=11, now=now))
    warehouse.load(rows)
    settings_dict = world_config(warehouse, schemas[1], name, **(destination_overrides or {}))
    settings = parse_settings(settings_dict)
    ledger = Ledger(pg_engine, schemas[1])
    ledger.create()
    with start_sandbox(name, **(sandbox_options or {})) as sandbox:
        for key, value in connection_env(name, sandbox.url).items():
            monkeypatch.setenv(key, value)
        yield WarehouseWorld(warehouse, name, sandbox, settings, ledger, rows, settings_dict)


def _hours(now: datetime) -> tuple[datetime, datetime]:
    last = now.replace(minute=0, second=0, microsecond=0)
    return last - timedelta(hours=3), last


def everything(now: datetime) -> Window:
    return Window(now - timedelta(days=3), now + timedelta(days=2), timedelta(0))


def assert_exactly_once(world: WarehouseWorld, before: datetime | None = None) -> None:
    deliverable = world.ids(True, before)
    assert deliverable, "the sample data has deliverable events"
    assert world.sandbox.accepted_keys() == deliverable
    assert len(world.sandbox.accepted()) == len(deliverable), "no event twice"
    assert world.ledger_keys("delivered") == deliverable
    assert world.ledger_keys("rejected") == world.ids(False, before)
    assert not world.ledger_keys("pending")


# Orb on every warehouse; Kable on one (the destination side does not depend on the source).
@pytest.mark.parametrize(("warehouse", "name"), [("snowflake", "orb"), ("snowflake", "kable"), ("bigquery", "orb"),
                                                 ("redshift", "orb")], indirect=["warehouse"])
def test_every_deliverable_event_arrives_once_the_rest_are_rejected_and_a_rerun_sends_nothing(
        name, warehouse, schemas, pg_url, pg_engine, monkeypatch):
    now = datetime.now(UTC)
    start, _ = _hours(now)
    for world in make_world(name, warehouse, schemas, pg_url, pg_engine, monkeypatch, start, now):
        reports = world.deliver(everything(now), run="first")
        assert_exactly_once(world)
        stats = sample_data.summarize(world.rows)
        assert sum(r.duplicates_dropped for r in reports) == stats.duplicates, "duplicates by id left in the warehouse"
        assert sum(r.mapping_rejected for r in reports) == len(world.ids(False))
        assert any("is empty" in reason for reason, _ in world.ledger.rejected_reasons(name)), "rejected with a reason"
        # One batched ledger lookup per chunk of at most source.chunk_size keys, never the whole ledger.
        assert world.lookups and max(world.lookups) <= CHUNK and len(world.lookups) > len(TABLES)
        for report in reports:
            summary = report.render()
            assert f"warehouse         {report.cost}" in summary and COST_SHOWS[warehouse.kind] in report.cost, summary

        requests = len(world.sandbox.requests)
        world.lookups.clear()
        again = world.deliver(everything(now), run="second")
        assert len(world.sandbox.requests) == requests, "the rerun sent nothing"
        assert sum(r.sent for r in again) == 0
        assert sum(r.mapping_rejected for r in again) == 0, "rejected rows not loaded again are not re-rejected"
        assert sum(r.already_delivered for r in again) == len(world.ids(True)) + len(world.ids(False)), \
            "skipped: delivered, or rejected at the same load"
        assert sum(world.lookups) == len(world.ids(True)), "every deliverable key looked up once, in chunks"
        assert_exactly_once(world)


def test_rows_loaded_late_into_an_earlier_window_are_delivered_by_the_next_windows_lookback(
        warehouse, schemas, pg_url, pg_engine, monkeypatch):
    now = datetime.now(UTC)
    start, last = _hours(now)
    boundary = last - timedelta(hours=1)
    for world in make_world("orb", warehouse, schemas, pg_url, pg_engine, monkeypatch, start, now):
        first = Window(now - timedelta(days=1), boundary, timedelta(0))
        world.deliver(first, run="hour-1")
        assert_exactly_once(world, before=boundary)

        # A warehouse sync that failed earlier lands now: rows whose loaded-at value lies in the
        # window already delivered (Segment stamps the time it staged them, not when they arrived).
        late = sample_data.generate_rows(sample_data.Sample(start, 1, 8, seed=99, now=now))
        stamp = boundary - timedelta(minutes=30)
        for batch in late.values():
            for row in batch:
                row.update(received_at=stamp, uuid_ts=stamp)
        world.add(late)
        late_ids = {row["id"] for batch in late.values() for row in batch if row["user_id"]}
        assert late_ids and not late_ids & world.sandbox.accepted_keys()

        second = Window(boundary, last, world.settings.source.lookback)  # the next hourly run, lookback 6 h
        reports = world.deliver(second, run="hour-2")
        assert late_ids <= world.sandbox.accepted_keys()
        assert sum(r.already_delivered for r in reports) > 0, "the lookback re-read delivered rows and skipped them"
        assert_exactly_once(world, before=last)


def test_a_task_killed_mid_window_is_completed_by_its_retry(warehouse, schemas, pg_url, pg_engine, monkeypatch):
    now = datetime.now(UTC)
    start, _ = _hours(now)
    for world in make_world("orb", warehouse, schemas, pg_url, pg_engine, monkeypatch, start, now,
                            sandbox_options={"server": ServerOptions(latency=0.15)}, destination_overrides={"orb": {"batch_size": 10}}):
        args = {"config": world.config, "destination": "orb", "window": everything(now).to_dict(), "run_id": "r1",
                "warehouse": True}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "include"), str(PROJECT / "plugins"),
                                                            str(PROJECT)])}
        child = subprocess.Popen([sys.executable, "-m", "tests.integration.deliver_child", json.dumps(args)],
                                 cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while len(world.sandbox.accepted()) < 40 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        time.sleep(0.5)  # requests already in the sandbox finish (latency 0.15 s) though the client is gone
        partial = world.sandbox.accepted_keys()
        assert 0 < len(partial) < len(world.ids(True))

        marked = world.ledger_keys("delivered")
        assert marked <= partial, "only confirmed events were marked"
        world.sandbox.latency = 0  # the latency only had to keep the child mid-window
        rejected = world.ledger_keys("rejected")  # rows rejected before the kill are settled too
        retry = world.deliver(everything(now), run="r1")  # Airflow's retry of the same task
        assert sum(r.already_delivered for r in retry) == len(marked) + len(rejected)
        assert_exactly_once(world)
        # Confirmed but not yet marked when the task died: sent again under the same idempotency keys
        # and de-duplicated by the destination.
        assert world.sandbox.duplicates == len(partial - marked)
