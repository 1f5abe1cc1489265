"""Bad input never crashes a run: each bad row is rejected with a message naming it, the rest is delivered."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.integration.conftest import make_world
from usage_billing.settings import parse_settings

ORB_MAPPING = {"amount": "amount", "huge": "huge", "meta": "meta", "note": "note", "currency": "currency",
               "latencyMs": "latency_ms"}


@pytest.fixture
def bad_world(pg_engine, schemas, monkeypatch):
    for world in make_world("orb", pg_engine, schemas, monkeypatch, events_per_hour=5,
                            destination_overrides={"orb": {"properties_mapping": ORB_MAPPING}}):
        table = f'"{world.schema}".api_call'
        with world.engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {table}"))
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN amount double precision, "
                                 f"ADD COLUMN huge numeric, ADD COLUMN meta jsonb, ADD COLUMN note text"))
        yield world


BAD_ROWS = {
    "good": ({}, None),
    "odd-unicode": ({"user_id": "cus_ü_漢字_🚀"}, None),
    "null-customer": ({"user_id": None}, "no external customer ID"),
    "empty-customer": ({"user_id": ""}, "no external customer ID"),
    "infinite": ({"amount": float("inf")}, "property amount: number inf is not finite"),
    "huge-integer": ({"huge": 2**70}, "property huge: integer 1180591620717411303424 does not fit in 64 bits"),
    "nested-json": ({"meta": '{"plan": {"tier": "pro"}}'}, "property meta: nested dict values are not allowed"),
    "array-json": ({"meta": "[1, 2]"}, "property meta: nested list values are not allowed"),
    "long-string": ({"note": "x" * 600}, "property note: string of 600 characters exceeds max_string_length 512"),
    "far-future": ({"timestamp": "2100-01-01T00:00:00Z"}, None),  # held until due, not rejected
    "far-past": ({"timestamp": "1990-01-01T00:00:00Z"}, None),
}


def test_each_bad_row_is_rejected_with_its_reason_and_the_rest_delivered(bad_world):
    world = bad_world
    with world.engine.begin() as conn:
        for name, (overrides, _) in BAD_ROWS.items():
            row = {"id": f"ajs-{name}", "user_id": "cus_acme", "event": "api_call", "event_text": "API Call",
                   "timestamp": world.now - timedelta(minutes=30), "received_at": world.now - timedelta(minutes=29),
                   "amount": 1.5, "huge": 7, "meta": None, "note": "ok", **overrides}
            columns = ", ".join(f'"{c}"' for c in row)
            values = ", ".join(f"CAST(:{c} AS jsonb)" if c == "meta" else f":{c}" for c in row)
            conn.execute(sa.text(f'INSERT INTO "{world.schema}".api_call ({columns}) VALUES ({values})'), row)
    reports = world.deliver(tables=["api_call"])
    delivered = world.ledger_keys("delivered")
    # Far-past events are not bad: they are delivered inside an Orb backfill (older than the grace period).
    assert delivered == {"ajs-good", "ajs-odd-unicode", "ajs-far-past"}
    assert world.ledger.status_of("orb", ["ajs-far-past"]) == {"ajs-far-past": "delivered"}
    assert [b["timeframe_start"].year for b in world.ledger.backfill_records("orb")] == [1990]
    reasons = {row["idempotency_key"]: row["reason"] for row in world.ledger.rejected("orb")}
    for name, (_, reason) in BAD_ROWS.items():
        if reason:
            assert reason in reasons[f"ajs-{name}"], (name, reasons.get(f"ajs-{name}"))
            assert f"ajs-{name}" in reasons[f"ajs-{name}"], "the message names the row"
    good = next(e for e in world.sandbox.accepted() if e["idempotency_key"] == "ajs-good")
    assert good["properties"] == {"amount": 1.5, "huge": 7, "note": "ok"}
    assert reports[0].destination_rejected == 0 and reports[0].mapping_rejected == len(BAD_ROWS) - 4
    assert reports[0].held == 1 and world.ledger.status_of("orb", ["ajs-far-future"]) == {"ajs-far-future": "held"}
    assert not any("currency" in note for note in reports[0].notes), "a property of other event types is no news"


def test_a_missing_event_table_is_reported_not_fatal(bad_world):
    world = bad_world
    settings = world.settings.model_copy(update={"source": world.settings.source.model_copy(
        update={"events": ["api_call", "table_that_does_not_exist"]})})
    world.settings = settings
    reports = world.deliver(tables=["table_that_does_not_exist", "tokens_used"])
    assert "does not exist yet" in reports[0].notes[0]
    assert reports[1].accepted > 0


def test_a_missing_loaded_at_column_names_the_setting(bad_world):
    world = bad_world
    from usage_billing.delivery import deliver_window
    from usage_billing.sources import Partition

    with pytest.raises(ValueError, match=r"source\.loaded_at_column: column .loaded_at. does not exist"):
        deliver_window(world.job(world.hook(), loaded_at_column="loaded_at"), Partition("tokens_used"), world.window())


def test_sql_identifiers_from_the_config_are_validated(bad_world):
    with pytest.raises(Exception, match="is not a valid SQL identifier"):
        parse_settings({"source": {"schema": 'x"; DROP TABLE y; --', "events": ["api_call"]},
                        "destinations": {"orb": {"external_customer_id_field": "userId", "properties_mapping": {}}}})
