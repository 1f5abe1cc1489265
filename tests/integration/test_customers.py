"""Customer preflight against the Orb sandbox over HTTP: unknown customers are named, or held until they exist."""

from __future__ import annotations

from tests.integration.conftest import make_world


def known_customers(world) -> set[str]:
    with world.engine.connect() as conn:
        import sqlalchemy as sa

        customers = set()
        for table in world.settings.source.events:
            customers |= {r[0] for r in conn.execute(sa.text(f'SELECT DISTINCT user_id FROM "{world.schema}".{table} '
                                                             f"WHERE user_id IS NOT NULL"))}
    return customers


def test_an_unknown_customer_is_named_in_the_summary_and_its_events_sent(pg_engine, schemas, monkeypatch):
    for world in make_world("orb", pg_engine, schemas, monkeypatch, sandbox_options={"customers": set()}):
        customers = known_customers(world)
        stranger = sorted(customers)[0]
        world.sandbox.add_customers(*(customers - {stranger}))
        reports = world.deliver()
        assert {c for r in reports for c in r.unknown_customers} == {stranger}
        assert any(f"{stranger} (" in r.render() for r in reports)
        assert world.sandbox.accepted_keys() == world.deliverable_ids(), "sent anyway, as Segment would"
        lookups = [r for r in world.sandbox.requests if "/v1/customers/" in r.path]
        assert len(lookups) == len(customers), "one lookup per customer per task, then cached"


def test_with_hold_the_unknown_customers_events_wait_and_are_delivered_once_it_exists(pg_engine, schemas,
                                                                                    monkeypatch):
    for world in make_world("orb", pg_engine, schemas, monkeypatch, sandbox_options={"customers": set()},
                            destination_overrides={"orb": {"unknown_customers": "hold"}}):
        customers = known_customers(world)
        stranger = sorted(customers)[0]
        world.sandbox.add_customers(*(customers - {stranger}))
        world.deliver(run="first")
        held = {e for e in world.deliverable_ids()} - world.sandbox.accepted_keys()
        assert held and world.ledger_keys("held") == held
        world.sandbox.add_customers(stranger)
        world.deliver(run="second")
        assert world.sandbox.accepted_keys() == world.deliverable_ids()
        assert len(world.sandbox.accepted()) == len(world.deliverable_ids()), "nothing sent twice"
        assert not world.ledger_keys("held")
