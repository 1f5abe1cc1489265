"""Rejected events are listed by reason and replayed, with their original keys, once fixed."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
import yaml

from tests.integration.conftest import config, make_world
from usage_billing import cli
from usage_billing.delivery import replay_rejected
from usage_billing.destinations import DESTINATIONS, get_destination


def replay(world, destination=None, reason_contains=None):
    from billing_airflow.operators.deliver import hook_class

    destination = destination or world.destination
    with hook_class(world.name)(destination.settings.conn_id, destination.settings) as hook:
        job = world.job(hook, "replay", destination=destination, chunk_size=100, concurrency=2)
        return [replay_rejected(job, table, reason_contains)
                for table in world.ledger.rejected_tables(world.name, reason_contains)]


def test_fixed_data_is_replayed_with_the_original_keys(world):
    world.deliver()
    anonymous = world.undeliverable_ids()
    assert world.ledger_keys("rejected") == anonymous
    with world.engine.begin() as conn:
        for table in world.settings.source.events:
            conn.execute(sa.text(f'UPDATE "{world.schema}".{table} SET user_id = \'cus_fixed\' WHERE user_id IS NULL'))
    reports = replay(world, reason_contains="is empty")
    assert sum(r.accepted for r in reports) == len(anonymous)
    assert not world.ledger_keys("rejected")
    assert world.sandbox.accepted_keys() == world.deliverable_ids()
    assert len(world.sandbox.accepted()) == len(world.deliverable_ids()), "nothing re-sent twice"


@pytest.mark.parametrize("name", list(DESTINATIONS))
def test_a_fixed_mapping_is_replayed(name, pg_engine, schemas, monkeypatch):
    for world in make_world(name, pg_engine, schemas, monkeypatch):
        world.deliver()
        anonymous = world.undeliverable_ids()
        field = {"orb": "external_customer_id_field", "kable": "client_id_field"}[name]
        fixed = world.settings.model_copy(update={"destinations": world.settings.destinations.model_copy(update={
            name: world.destination.settings.model_copy(update={field: "anonymousId"})})})
        replay(world, get_destination(name, fixed))
        key, customer = ("idempotency_key", "external_customer_id") if name == "orb" else ("transactionId", "clientId")
        replayed = {e[key]: e[customer] for e in world.sandbox.accepted() if e[key] in anonymous}
        with world.engine.connect() as conn:
            expected = {row.id: row.anonymous_id for table in world.settings.source.events for row in conn.execute(
                sa.text(f'SELECT id, anonymous_id FROM "{world.schema}".{table} WHERE user_id IS NULL'))}
        assert replayed == expected
        assert not world.ledger_keys("rejected")


def test_the_cli_lists_rejections_by_reason(world, capsys, pg_url, monkeypatch, tmp_path):
    world.deliver()
    path = tmp_path / "usage_billing.yaml"
    path.write_text(yaml.safe_dump(config(world.schema, world.ledger.schema)))
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    assert cli.main(["--ledger-url", pg_url, "rejected", "--destination", world.name, "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{len(world.undeliverable_ids())} x no " in out
    assert out.count("x1  ") == 3
