"""The core's unit-test world: an in-memory warehouse, a SQLite ledger and a fake destination.

No PostgreSQL, no HTTP: these tests run in seconds and say what the core does with what the
destination answers. The HTTP conformance suite (tests/integration) runs the same behaviours
against the real hooks and the sandboxes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from usage_billing.delivery import DeliveryJob
from usage_billing.delivery.fake import FakeSender
from usage_billing.destinations import get_destination
from usage_billing.ledger import Ledger, RunRef
from usage_billing.settings import parse_settings
from usage_billing.sources import Partition, Window
from usage_billing.sources.memory import MemorySource
from usage_billing.sources.postgres import create_engine

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def events(count: int, *, start: datetime = NOW - timedelta(hours=1), step: timedelta = timedelta(seconds=10),
           loaded_after: timedelta = timedelta(seconds=5), prefix: str = "m") -> pd.DataFrame:
    """``count`` api_call rows of Segment's layout, one customer per ten events."""
    stamps = [start + i * step for i in range(count)]
    frame = pd.DataFrame({
        "id": [f"{prefix}{i:05d}" for i in range(count)],
        "user_id": [f"cus_{i // 10}" for i in range(count)],
        "event": "api_call", "event_text": "API Call",
        "timestamp": stamps, "received_at": [s + loaded_after for s in stamps],
        "amount": [i % 7 for i in range(count)],
    })
    frame = frame.convert_dtypes(dtype_backend="numpy_nullable")
    for column in ("timestamp", "received_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def settings(destination: str = "orb", **overrides):
    sections = {
        "orb": {"external_customer_id_field": "userId", "properties_mapping": {"amount": "amount"},
                "batch_size": 50, "concurrency": 3},
        "kable": {"batch_size": 50, "concurrency": 3},
    }
    return parse_settings({"source": {"schema": "memory", "events": ["api_call"], "chunk_size": 100},
                           "destinations": {destination: {**sections[destination], **overrides}}})


@dataclass
class Core:
    """One destination, one warehouse table, one ledger."""

    source: MemorySource
    ledger: Ledger
    sender: FakeSender
    name: str = "orb"
    overrides: dict | None = None

    def job(self, run: str = "run-1", **fields) -> DeliveryJob:
        config = settings(self.name, **(self.overrides or {}))
        job = DeliveryJob.from_settings(config, get_destination(self.name, config), self.source, self.ledger,
                                        self.sender, RunRef(f"segment_to_{self.name}", run))
        return dataclasses.replace(job, **{"now": lambda: NOW, **fields})

    def statuses(self) -> dict[str, str]:
        keys = list(self.source.tables["api_call"]["id"])
        return self.ledger.status_of(self.name, keys)

    def attempts(self) -> dict[str, int]:
        """How many times the ledger marked each key (a mark made again counts)."""
        t = self.ledger.table.c
        with self.ledger.engine.connect() as conn:
            return dict(conn.execute(sa.select(t.idempotency_key, t.attempts).where(t.destination == self.name))
                        .tuples().all())


WINDOW = Window(NOW - timedelta(hours=2), NOW)
PARTITION = Partition("api_call")


@pytest.fixture
def core(tmp_path) -> Core:
    engine = create_engine(f"sqlite:///{tmp_path}/ledger.db", ["usage_billing"])
    ledger = Ledger(engine, "usage_billing")
    ledger.create()
    yield Core(MemorySource({"api_call": events(300)}), ledger, FakeSender())
    engine.dispose()
