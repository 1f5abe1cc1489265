"""Shared fixtures for integration tests: sample warehouse on PostgreSQL, sandboxes, delivery wiring."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from usage_billing import sample_data
from usage_billing.delivery import DeliveryJob
from usage_billing.destinations import DESTINATIONS, Destination, get_destination
from usage_billing.ledger import Ledger, RunRef
from usage_billing.sandbox import KableSandbox, OrbSandbox
from usage_billing.settings import parse_settings
from usage_billing.sources import Partition, Window
from usage_billing.sources.postgres.source import SqlSource

ORB_KEY = "orb-test-key-not-a-secret-123"
KABLE_CLIENT, KABLE_KEY = "kci_test", "sk_test.sandbox-secret-456"
FAST_RETRIES = {"backoff_initial": 0, "backoff_max": 0, "max_attempts": 4, "timeout": 2}


def config(schema: str, ledger_schema: str, **destination_overrides) -> dict:
    """A configuration like the shipped one, pointed at test schemas, with zero-wait retries."""
    return {
        "source": {"conn_id": "segment_warehouse", "schema": schema,
                   "events": ["api_call", "payment_confirmed", "tokens_used"],
                   "loaded_at_column": "received_at", "lookback": "6h", "chunk_size": 500},
        "ledger": {"conn_id": "segment_warehouse", "schema": ledger_schema},
        # A failing task must fail the test at once, not wait for Airflow's retry delay.
        "airflow": {"retries": 0},
        "destinations": {
            "orb": {"conn_id": "orb_default", "external_customer_id_field": "userId",
                    "properties_mapping": {"amount": "amount", "currency": "currency", "latencyMs": "latency_ms",
                                           "bytes": "bytes"},
                    "requests_per_second": 1000, "events_per_minute": 1_000_000, **FAST_RETRIES,
                    **destination_overrides.get("orb", {})},
            "kable": {"conn_id": "kable_default", "properties_mappings": {"statusCode": "status", "plan.tier": "tier"},
                      "event_name_key": "event",
                      "requests_per_second": 1000, "events_per_minute": 1_000_000, **FAST_RETRIES,
                      **destination_overrides.get("kable", {})},
        },
    }


@dataclass
class World:
    """A warehouse with sample data, a sandbox and everything a delivery job needs."""

    name: str
    engine: sa.Engine
    schema: str
    ledger: Ledger
    sandbox: OrbSandbox | KableSandbox
    destination: Destination
    settings: object
    now: datetime
    stats: object
    sleeps: list[float] = field(default_factory=list)

    def window(self) -> Window:
        # Everything loaded so far: late rows land hours after their event time.
        return Window(self.now - timedelta(days=3), self.now + timedelta(days=2), timedelta(0))

    def hook(self, **overrides):
        from billing_airflow.operators.deliver import hook_class

        settings = self.destination.settings.model_copy(update=overrides)
        return hook_class(self.name)(settings.conn_id, settings, sleep=self.sleeps.append)

    def job(self, hook, run: str = "run-1", **overrides) -> DeliveryJob:
        """The delivery job a task of this world would build (the ledger shares the warehouse's engine)."""
        fields = dict(destination=self.destination, sender=hook, source=SqlSource(self.engine, self.schema),
                      ledger=self.ledger, run=RunRef("test_dag", run), loaded_at_column="received_at",
                      chunk_size=self.settings.source.chunk_size, concurrency=self.destination.settings.concurrency)
        return DeliveryJob(**{**fields, **overrides})

    def deliver(self, run: str = "run-1", hook=None, tables=None, window: Window | None = None, **overrides):
        from usage_billing.delivery import deliver_window

        hook = hook or self.hook()
        with hook:
            job = self.job(hook, run, **overrides)
            return [deliver_window(job, Partition(table), window or self.window())
                    for table in tables or self.settings.source.events]

    def deliverable_ids(self, tables: list[str] | None = None) -> set[str]:
        """Warehouse ids that make a valid event: what the destination must end up with, once each."""
        return self._ids("user_id IS NOT NULL AND trim(user_id) <> ''", tables)

    def undeliverable_ids(self) -> set[str]:
        """Warehouse ids without a customer: what the ledger must hold as rejected."""
        return self._ids("user_id IS NULL OR trim(user_id) = ''")

    def _ids(self, condition: str, tables: list[str] | None = None) -> set[str]:
        ids: set[str] = set()
        with self.engine.connect() as conn:
            for table in tables or self.settings.source.events:
                rows = conn.execute(sa.text(f'SELECT DISTINCT id FROM "{self.schema}".{table} WHERE {condition}'))
                ids.update(r[0] for r in rows)
        return ids

    def ingest_requests(self) -> list:
        """The sandbox's event batches (its other requests: customer lookups, backfills)."""
        return [r for r in self.sandbox.requests if r.path.rstrip("/").endswith(("/ingest", "/events/create"))]

    def ledger_keys(self, status: str) -> set[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.ledger.table.c.idempotency_key).where(
                self.ledger.table.c.destination == self.name, self.ledger.table.c.status == status))
            return {r[0] for r in rows}


def start_sandbox(name: str, **kwargs):
    """The local API standing in for destination ``name``; a new destination adds its own here."""
    if name == "orb":
        return OrbSandbox(api_key=ORB_KEY, **kwargs)
    if name == "kable":
        return KableSandbox(client_id=KABLE_CLIENT, api_key=KABLE_KEY, **kwargs)
    raise LookupError(f"no sandbox for destination {name!r}: add one to start_sandbox and connection_env")


def connection_env(name: str, url: str) -> dict[str, str]:
    if name == "orb":
        return {"AIRFLOW_CONN_ORB_DEFAULT": json.dumps({"conn_type": "http", "host": url, "password": ORB_KEY})}
    return {"AIRFLOW_CONN_KABLE_DEFAULT": json.dumps({"conn_type": "http", "host": url, "login": KABLE_CLIENT,
                                                      "password": KABLE_KEY})}


@pytest.fixture(params=list(DESTINATIONS))
def world(request, pg_engine, schemas, monkeypatch):
    """The conformance fixture: every test using it runs once against each registered destination."""
    yield from make_world(request.param, pg_engine, schemas, monkeypatch)


def make_world(name, pg_engine, schemas, monkeypatch, sandbox_options=None, destination_overrides=None,
               events_per_hour=60, hours=3):
    schema, ledger_schema = schemas
    now = datetime.now(UTC)
    first_hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours)
    stats = sample_data.generate(pg_engine, schema, sample_data.Sample(start=first_hour, hours=hours,
                                                                       events_per_hour=events_per_hour, seed=11, now=now))
    settings = parse_settings(config(schema, ledger_schema, **(destination_overrides or {})))
    ledger = Ledger(pg_engine, ledger_schema)
    ledger.create()
    with start_sandbox(name, **(sandbox_options or {})) as sandbox:
        for key, value in connection_env(name, sandbox.url).items():
            monkeypatch.setenv(key, value)
        yield World(name, pg_engine, schema, ledger, sandbox, get_destination(name, settings), settings, now, stats)
