"""The ledger's tables are versioned: an existing ledger is upgraded in place, a new one is created at
the newest revision, and tasks starting at once do not trip over each other. On PostgreSQL and SQLite."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
import yaml
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.integration.conftest import config
from usage_billing import cli
from usage_billing.destinations.base import Rejection
from usage_billing.ledger import EventRefs, Ledger, RetryRejected, RunRef, migrate
from usage_billing.ledger.tables import ledger_tables
from usage_billing.sources.postgres import create_engine

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 24, 8, 30, 15, 123456, tzinfo=UTC)
RUN = RunRef("segment_to_orb", "scheduled__after_upgrade")


def previous_ledger_tables(schema: str) -> sa.MetaData:
    """Frozen: the tables exactly as the unversioned ledger.py defined them (before Alembic)."""
    def key(length: int) -> sa.types.TypeEngine:
        return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")

    metadata = sa.MetaData(schema=schema)
    sa.Table("deliveries", metadata,
             sa.Column("destination", key(32), primary_key=True),
             sa.Column("idempotency_key", key(255), primary_key=True),
             sa.Column("status", sa.String(16), nullable=False),
             sa.Column("reason", sa.Text),
             sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
             sa.Column("message_id", sa.String(255)),
             sa.Column("event_table", sa.String(128)),
             sa.Column("event_timestamp", sa.DateTime(timezone=True)),
             sa.Column("first_attempt_at", sa.DateTime(timezone=True)),
             sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
             sa.Column("delivered_at", sa.DateTime(timezone=True)),
             sa.Column("dag_id", sa.String(250)),
             sa.Column("run_id", sa.String(250)),
             sa.Column("backfill_id", sa.String(100)),
             sa.Column("mode", sa.String(16)),
             sa.Index("ix_deliveries_rejected", "destination", "event_table",
                      postgresql_where=sa.text("status = 'rejected'"), sqlite_where=sa.text("status = 'rejected'")))
    sa.Table("delivery_history", metadata,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("destination", sa.String(32), nullable=False),
             sa.Column("idempotency_key", sa.String(255), nullable=False),
             sa.Column("status", sa.String(16), nullable=False),
             sa.Column("reason", sa.Text),
             sa.Column("delivered_at", sa.DateTime(timezone=True)),
             sa.Column("backfill_id", sa.String(100)),
             sa.Column("mode", sa.String(16)),
             sa.Column("run_id", sa.String(250)),
             sa.Column("superseded_at", sa.DateTime(timezone=True)),
             sa.Column("superseded_by_run", sa.String(250)),
             sa.Index("ix_delivery_history_key", "destination", "idempotency_key"))
    sa.Table("backfills", metadata,
             sa.Column("destination", sa.String(32), primary_key=True),
             sa.Column("backfill_id", sa.String(100), primary_key=True),
             sa.Column("timeframe_start", sa.DateTime(timezone=True), nullable=False),
             sa.Column("timeframe_end", sa.DateTime(timezone=True), nullable=False),
             sa.Column("replace_existing_events", sa.Boolean, nullable=False),
             sa.Column("status", sa.String(32), nullable=False),
             sa.Column("events_sent", sa.Integer, nullable=False, server_default="0"),
             sa.Column("created_at", sa.DateTime(timezone=True)),
             sa.Column("closed_at", sa.DateTime(timezone=True)),
             sa.Column("dag_id", sa.String(250)),
             sa.Column("run_id", sa.String(250)))
    return metadata


def create_previous_ledger(engine: sa.Engine, schema: str) -> sa.MetaData:
    """What the unversioned Ledger.create() ran, with rows of every kind in it."""
    metadata = previous_ledger_tables(schema)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        metadata.create_all(conn)
        deliveries, history, backfills = (metadata.tables[f"{schema}.{name}"]
                                          for name in ("deliveries", "delivery_history", "backfills"))
        conn.execute(deliveries.insert(), [
            {"destination": "orb", "idempotency_key": "k-delivered", "status": "delivered", "attempts": 2,
             "message_id": "m-1", "event_table": "api_call", "event_timestamp": T1, "first_attempt_at": T0,
             "last_attempt_at": T0, "delivered_at": T0, "dag_id": "segment_to_orb", "run_id": "r1",
             "backfill_id": "bf_1", "mode": "replace", "reason": None},
            {"destination": "orb", "idempotency_key": "k-rejected", "status": "rejected",
             "reason": "api_call row id=m-2: no external customer ID", "attempts": 1, "message_id": "m-2",
             "event_table": "api_call", "event_timestamp": None, "first_attempt_at": T0, "last_attempt_at": T0,
             "delivered_at": None, "dag_id": "segment_to_orb", "run_id": "r1", "backfill_id": None, "mode": None},
            {"destination": "kable", "idempotency_key": 'we"ird\\key', "status": "delivered", "attempts": 1,
             "message_id": "m-3", "event_table": "tokens_used", "event_timestamp": T0, "first_attempt_at": T0,
             "last_attempt_at": T0, "delivered_at": T0, "dag_id": "segment_to_kable", "run_id": "r2",
             "backfill_id": None, "mode": "ingest", "reason": None},
        ])
        conn.execute(history.insert(), [
            {"destination": "orb", "idempotency_key": "k-delivered", "status": "delivered", "delivered_at": T0,
             "backfill_id": "bf_0", "mode": "backfill", "run_id": "r0", "superseded_at": T0,
             "superseded_by_run": "r1"}])
        conn.execute(backfills.insert(), [
            {"destination": "orb", "backfill_id": "bf_1", "timeframe_start": T0, "timeframe_end": T1,
             "replace_existing_events": True, "status": "reflected", "events_sent": 7, "created_at": T0,
             "closed_at": T1, "dag_id": "segment_to_orb", "run_id": "r1"}])
    return metadata


def snapshot(engine: sa.Engine, metadata: sa.MetaData) -> dict[str, list[dict]]:
    """Every row of every table in ``metadata``, in a stable order."""
    with engine.connect() as conn:
        return {name: sorted((dict(row._mapping) for row in conn.execute(sa.select(table))), key=repr)
                for name, table in metadata.tables.items()}


def schema_differences(engine: sa.Engine, schema: str) -> list:
    """What Alembic's autogenerate finds between the database and ``tables.py`` (empty: they agree)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "include_schemas": True, "version_table_schema": schema,
            "include_name": lambda name, kind, _parents: kind != "schema" or name == schema})
        return compare_metadata(context, ledger_tables(schema).deliveries.metadata)


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request, schemas, pg_url, tmp_path):
    """(engine, ledger schema) with nothing created in the schema yet."""
    if request.param == "postgresql":
        engine, schema = create_engine(pg_url), schemas[1]
    else:
        schema = "usage_billing"
        engine = create_engine(f"sqlite:///{tmp_path}/wh.db", [schema])
    yield engine, schema
    engine.dispose()


def start_at_once(count: int, action) -> list:
    """Run ``action`` in ``count`` threads released together; return their results (raising any error)."""
    barrier = threading.Barrier(count)

    def run(_: int):
        barrier.wait()
        return action()
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_a_ledger_from_before_versioning_is_upgraded_in_place_without_losing_a_row(database):
    engine, schema = database
    previous = create_previous_ledger(engine, schema)
    before = snapshot(engine, previous)
    assert Ledger(engine, schema).current_revision() is None, "the unversioned ledger has no version table"

    # Every task of the first run after the upgrade calls create(): several at once.
    start_at_once(3, lambda: Ledger(engine, schema).create())

    ledger = Ledger(engine, schema)
    assert ledger.current_revision() == migrate.head() == "0007"
    assert snapshot(engine, previous) == before, "every earlier row is still there, value for value"
    with engine.connect() as conn:
        new_columns = conn.execute(sa.select(ledger.table.c.customer_id, ledger.table.c.event_name)).all()
    assert new_columns == [(None, None)] * 3
    assert schema_differences(engine, schema) == [], "the upgraded tables are the ones tables.py describes"

    # The protocol works on the upgraded rows, and the new columns are filled from the marks.
    assert ledger.known_keys("orb", ["k-delivered", "k-rejected"], RetryRejected.ALWAYS) == {"k-delivered"}
    ledger.mark_rejected("orb", RUN, [Rejection("k-delivered", "m-1", "api_call", "late rejection")], T1)
    ledger.mark_delivered("orb", RUN, EventRefs(["k-rejected", "k-new"], ["m-2", "m-4"], ["api_call"] * 2, [T0, T1],
                                                customer_ids=["cus_2", "cus_4"], event_names=["api_call", None]), T1)
    assert ledger.status_of("orb", ["k-delivered", "k-rejected", "k-new"]) == {
        "k-delivered": "delivered", "k-rejected": "delivered", "k-new": "delivered"}
    with engine.connect() as conn:
        rows = {row.idempotency_key: row for row in conn.execute(sa.select(ledger.table))}
    assert (rows["k-new"].customer_id, rows["k-new"].event_name) == ("cus_4", None)
    assert (rows["k-rejected"].customer_id, rows["k-rejected"].attempts) == ("cus_2", 2)
    assert rows["k-delivered"].customer_id is None and rows["k-delivered"].attempts == 2
    assert [h["backfill_id"] for h in ledger.history_of("orb", "k-delivered")] == ["bf_0"]
    assert [b["events_sent"] for b in ledger.backfill_records("orb")] == [7]
    ledger.record_day_counts("orb", {T1.date(): {"warehouse": 3, "delivered": 2, "rejected": 1, "held": 0}}, RUN, T1)
    with engine.connect() as conn:
        assert conn.execute(sa.select(ledger.day_counts_table.c.day, ledger.day_counts_table.c.warehouse)).all() == [
            (T1.date(), 3)], "0006's table, empty after the upgrade, takes the sweep's counts"


def test_a_mark_without_customer_ids_keeps_the_ones_the_ledger_has(database):
    engine, schema = database
    ledger = Ledger(engine, schema)
    ledger.create()
    ledger.mark_delivered("orb", RUN, EventRefs(["k"], ["m"], ["api_call"], [T0], ["cus_1"], ["api_call"]), T0)
    ledger.mark_delivered("orb", RUN, EventRefs(["k"], ["m"], ["api_call"], [T0]), T1)
    with engine.connect() as conn:
        row = conn.execute(sa.select(ledger.table)).one()
    assert (row.customer_id, row.event_name, row.attempts) == ("cus_1", "api_call", 2)


def test_a_fresh_install_is_created_at_the_newest_revision(database):
    engine, schema = database
    ledger = Ledger(engine, schema)
    assert ledger.current_revision() is None
    ledger.create()
    assert ledger.current_revision() == migrate.head()
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        assert inspector.has_table("alembic_version", schema=schema), "the version table is in the ledger schema"
        assert {"customer_id", "event_name"} <= {c["name"] for c in inspector.get_columns("deliveries", schema=schema)}
        assert {"findings", "day_counts"} <= set(inspector.get_table_names(schema=schema))
    assert schema_differences(engine, schema) == []


def test_create_is_safe_twice_and_from_several_tasks_at_once(database):
    engine, schema = database
    start_at_once(4, lambda: Ledger(engine, schema).create())
    ledger = Ledger(engine, schema)
    ledger.create()
    assert ledger.current_revision() == migrate.head()
    with engine.connect() as conn:
        versions = conn.execute(sa.text(f'SELECT version_num FROM "{schema}".alembic_version')).scalars().all()
    assert versions == [migrate.head()], "one version row, however many tasks upgraded"
    ledger.mark_delivered("orb", RUN, EventRefs(["k"], ["m"], ["api_call"], [T0]), T0)
    assert ledger.counts() == {"orb": {"delivered": 1}}


def test_ledgers_in_different_schemas_do_not_wait_for_each_other_on_a_lock(schemas, pg_url):
    """Two deployments in one PostgreSQL database: one holding "orb:api_call" must not block the other.
    A ledger of the same schema does wait (the key is the schema's, not the database's)."""
    engine = create_engine(pg_url)
    first, second, same = Ledger(engine, schemas[0]), Ledger(engine, schemas[1]), Ledger(engine, schemas[0])
    held, release = threading.Event(), threading.Event()
    second_in, same_in = threading.Event(), threading.Event()

    def hold() -> None:
        with first.lock("orb:api_call"):
            held.set()
            release.wait(30)

    def take(ledger: Ledger, inside: threading.Event) -> None:
        with ledger.lock("orb:api_call"):
            inside.set()

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    try:
        assert held.wait(10)
        threads += [threading.Thread(target=take, args=(second, second_in)),
                    threading.Thread(target=take, args=(same, same_in))]
        for thread in threads[1:]:
            thread.start()
        assert second_in.wait(10), "another schema's ledger acquired its lock while the first was held"
        assert not same_in.is_set(), "the same schema's lock is one lock"
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
        engine.dispose()
    assert same_in.is_set(), "released, the same schema's waiter got in"


def test_the_cli_upgrades_the_ledger_on_demand_and_checks_its_revision(database, capsys, monkeypatch, tmp_path):
    engine, schema = database
    previous = create_previous_ledger(engine, schema)
    before = snapshot(engine, previous)
    path = tmp_path / "usage_billing.yaml"
    path.write_text(yaml.safe_dump(config("segment", schema)))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    url = engine.url.render_as_string(hide_password=False)

    assert cli.main(["--ledger-url", url, "ledger-upgrade", "--check"]) == 1, "behind: the check says so"
    assert Ledger(engine, schema).current_revision() is None, "and changes nothing"
    assert cli.main(["--ledger-url", url, "ledger-upgrade"]) == 0
    assert cli.main(["--ledger-url", url, "ledger-upgrade", "--check"]) == 0
    out = capsys.readouterr().out
    assert f"ledger {schema}: revision (none), newest {migrate.head()}" in out
    assert f"ledger {schema}: upgraded to {migrate.head()}" in out
    assert Ledger(engine, schema).current_revision() == migrate.head()
    assert snapshot(engine, previous) == before


def test_a_ledger_upgraded_by_a_newer_release_is_left_alone(database):
    """A rolling deployment: an older task starts after a newer one migrated the ledger."""
    engine, schema = database
    ledger = Ledger(engine, schema)
    ledger.create()
    with engine.begin() as conn:
        conn.execute(sa.text(f'UPDATE "{schema}".alembic_version SET version_num = :newer'), {"newer": "0099"})
    ledger.create()
    assert ledger.current_revision() == "0099"
    ledger.mark_delivered("orb", RUN, EventRefs(["k"], ["m"], ["api_call"], [T0]), T0)
    assert ledger.known_keys("orb", ["k"], RetryRejected.ALWAYS) == {"k"}
