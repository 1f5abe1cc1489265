"""The ledger's check -> send -> mark protocol on the real PostgreSQL (and on SQLite)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from usage_billing.destinations.base import Rejection
from usage_billing.ledger import EventRefs, Ledger, RetryRejected, Route, RunRef
from usage_billing.sources.postgres import create_engine

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
RUN_A = RunRef("segment_to_orb", "scheduled__A")
RUN_B = RunRef("segment_to_orb", "backfill__B")


@pytest.fixture(params=["postgresql", "sqlite"])
def ledger(request, schemas, pg_url, tmp_path):
    if request.param == "postgresql":
        engine = create_engine(pg_url)
        schema = schemas[1]
    else:
        schema = "usage_billing"
        engine = create_engine(f"sqlite:///{tmp_path}/wh.db", [schema])
    book = Ledger(engine, schema)
    book.create()
    book.create()  # idempotent
    yield book
    engine.dispose()


def deliver(book: Ledger, run: RunRef, keys: list[str], destination: str = "orb", route: Route = Route()) -> None:
    book.mark_delivered(destination, run, EventRefs(keys, [f"msg-{k}" for k in keys], ["api_call"] * len(keys),
                                                    [T0] * len(keys)), T0, route)


def reject(book: Ledger, run: RunRef, key: str, reason: str) -> None:
    book.mark_rejected("orb", run, [Rejection(key, f"msg-{key}", "api_call", f"api_call row id={key}: {reason}", T0)],
                       T0)


def row(book: Ledger, key: str, destination: str = "orb") -> dict:
    with book.engine.connect() as conn:
        return dict(conn.execute(sa.select(book.table).where(book.table.c.idempotency_key == key,
                                                             book.table.c.destination == destination))
                    .mappings().one())


def test_delivered_keys_are_known_and_the_rest_are_not(ledger):
    deliver(ledger, RUN_A, ["a", "b"])
    assert ledger.known_keys("orb", ["a", "b", "c"], RetryRejected.ALWAYS) == {"a", "b"}
    assert ledger.counts("orb") == {"orb": {"delivered": 2}}
    recorded = row(ledger, "a")
    assert recorded["message_id"] == "msg-a" and recorded["event_table"] == "api_call"
    assert recorded["run_id"] == RUN_A.run_id and recorded["delivered_at"] is not None and recorded["mode"] == "ingest"


def test_destinations_are_independent(ledger):
    deliver(ledger, RUN_A, ["a"])
    assert ledger.known_keys("kable", ["a"], RetryRejected.ALWAYS) == set()


def test_rejected_keys_are_recorded_with_reason_and_retried_unless_the_sweep_asks(ledger):
    reject(ledger, RUN_A, "x", "no external customer ID")
    reject(ledger, RUN_A, "y", "no external customer ID")
    assert ledger.rejected_reasons("orb") == [("no external customer ID", 2)]
    rows = ledger.rejected("orb")
    assert [r["idempotency_key"] for r in rows] == ["x", "y"] and rows[0]["event_table"] == "api_call"
    assert ledger.known_keys("orb", ["x"], RetryRejected.ALWAYS) == set(), "a replay sends a rejected event again"
    assert ledger.known_keys("orb", ["x"], RetryRejected.NEVER) == {"x"}, "the sweep leaves it to a replay"
    assert ledger.rejected_tables("orb") == ["api_call"]


def test_a_rejected_event_delivered_later_becomes_delivered(ledger):
    reject(ledger, RUN_A, "x", "no external customer ID")
    deliver(ledger, RUN_B, ["x"])
    recorded = row(ledger, "x")
    assert recorded["status"] == "delivered" and recorded["reason"] is None and recorded["attempts"] == 2


def test_a_delivered_event_is_never_downgraded_to_rejected(ledger):
    deliver(ledger, RUN_A, ["a"])
    reject(ledger, RUN_B, "a", "later mapping change")
    assert ledger.status_of("orb", ["a"]) == {"a": "delivered"}


def test_replace_mode_keeps_the_earlier_delivery_in_the_history(ledger):
    deliver(ledger, RUN_A, ["a"], route=Route("backfill", "bf_1"))
    deliver(ledger, RUN_B, ["a"], route=Route("replace", "bf_2"))
    (earlier,) = ledger.history_of("orb", "a")
    assert earlier["backfill_id"] == "bf_1" and earlier["mode"] == "backfill" and earlier["run_id"] == RUN_A.run_id
    assert earlier["superseded_by_run"] == RUN_B.run_id
    assert row(ledger, "a")["backfill_id"] == "bf_2"


def test_a_quote_or_backslash_in_a_key_survives_the_array_encoding(ledger):
    keys = ['we"ird', "back\\slash", "comma,brace}", "ünï"]
    deliver(ledger, RUN_A, keys)
    assert ledger.known_keys("orb", keys, RetryRejected.ALWAYS) == set(keys)


@pytest.mark.parametrize("keys", [
    ["plain-1", "plain-2"],                    # the one-join fast path
    ["a", 'b","c'],                            # a key that looks like the separator
    ["", "x"],                                 # an empty key between quotes
    ['ends with a quote"', "next"],
])
def test_array_literals_round_trip_exactly(ledger, keys):
    deliver(ledger, RUN_A, keys)
    assert ledger.known_keys("orb", [*keys, "absent"], RetryRejected.ALWAYS) == set(keys)
    assert {row(ledger, key)["message_id"] for key in keys} == {f"msg-{key}" for key in keys}


def test_event_timestamps_keep_microseconds_and_nulls(ledger):
    stamps = [datetime(2026, 11, 23, 12, 34, 56, 123456, tzinfo=UTC), None, datetime(1999, 12, 31, 23, 59, tzinfo=UTC)]
    ledger.mark_delivered("orb", RUN_A, EventRefs(["k1", "k2", "k3"], ["m1", "m2", "m3"], ["t"] * 3, stamps), T0)
    recorded = [row(ledger, key)["event_timestamp"] for key in ("k1", "k2", "k3")]
    as_utc = [None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC)) for value in recorded]
    assert as_utc == stamps


def test_the_partition_lock_lets_one_run_in_at_a_time(ledger):
    """Overlapping runs of one partition take turns; other partitions are not held up."""
    inside, overlaps = [], []
    guard = threading.Lock()

    def run(name: str) -> None:
        with ledger.lock(name):
            with guard:
                inside.append(name)
                overlaps.append(inside.count(name))
            time.sleep(0.2)
            with guard:
                inside.remove(name)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(run, ["orb:api_call"] * 3 + ["orb:tokens_used"] * 3))
    assert max(overlaps) == 1

    # Another partition is not held up: it gets its lock while the first one is still held.
    holding, other_in, release = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with ledger.lock("orb:api_call"):
            holding.set()
            release.wait(30)

    def other() -> None:
        with ledger.lock("orb:tokens_used"):
            other_in.set()

    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(hold)
        assert holding.wait(30)
        pool.submit(other)
        assert other_in.wait(30), "the two partitions ran side by side"
        release.set()
        held.result()


def test_ten_runs_marking_the_same_keys_at_once_leave_one_row_per_key(ledger):
    keys = [f"k{i}" for i in range(2000)]
    runs = [RunRef("segment_to_orb", f"run{i}") for i in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda r: deliver(ledger, r, keys), runs))
    assert ledger.counts("orb") == {"orb": {"delivered": 2000}}


def test_stale_statistics_are_refreshed_once(ledger):
    if ledger.engine.dialect.name != "postgresql":
        assert ledger.refresh_statistics() is False
        return
    deliver(ledger, RUN_A, [f"k{i}" for i in range(2_000)])
    # PostgreSQL publishes a backend's row counts within about a second of its transaction.
    deadline = time.monotonic() + 10
    while not ledger.refresh_statistics():
        assert time.monotonic() < deadline, "2,000 rows changed on an empty table must count as stale"
        time.sleep(0.2)
    assert ledger.refresh_statistics() is False
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"),
                            {"t": f'"{ledger.schema}".deliveries'}).scalar_one()
    assert rows == 2_000


def test_rejected_event_timestamps_keep_microseconds_and_nulls(ledger):
    stamps = [datetime(2026, 11, 23, 12, 34, 56, 123456, tzinfo=UTC), None]
    ledger.mark_rejected("orb", RUN_A, [Rejection(f"r{i}", f"m{i}", "t", "bad", stamp)
                                        for i, stamp in enumerate(stamps)], T0)
    recorded = [row(ledger, key)["event_timestamp"] for key in ("r0", "r1")]
    assert [None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC))
            for value in recorded] == stamps


def test_columns_of_different_lengths_are_refused_before_any_sql():
    with pytest.raises(ValueError, match="different lengths"):
        EventRefs(["a", "b"], ["m"], ["t", "t"], [T0, T0])


# -- what the Billing view reads (billing_airflow.ui.billing_view), on both dialects -----------------

DAY = T0.date().isoformat()


def billing_ledger(book: Ledger) -> None:
    """orb: a1, a2 (acme, api_call and login) live, b1 (acme) through backfill bf_1, n1 with no customer;
    rejected r1 (acme), held h1 (no customer). kable: k1 (zeta)."""
    def deliver_to(destination: str, keys: list[str], customers: list[str | None], names: list[str],
                   route: Route = Route()) -> None:
        book.mark_delivered(destination, RUN_A, EventRefs(keys, keys, ["api_call"] * len(keys), [T0] * len(keys),
                                                          customers, names), T0, route)

    deliver_to("orb", ["a1", "a2"], ["acme", "acme"], ["api_call", "login"])
    deliver_to("orb", ["b1"], ["acme"], ["api_call"], Route("backfill", "bf_1"))
    deliver_to("orb", ["n1"], [None], ["api_call"])
    deliver_to("kable", ["k1"], ["zeta"], ["api_call"])
    book.mark_rejected("orb", RUN_A, [Rejection("r1", "m-r1", "api_call", "bad amount", T0, customer="acme")], T0)
    book.mark_rejected("orb", RUN_A, [Rejection("h1", "m-h1", "api_call", "in the future", T0)], T0, status="held")


def test_the_ledger_says_which_of_its_tables_exist(ledger):
    assert all(ledger.has_table(name) for name in ("deliveries", "day_counts", "findings", "backfills"))
    assert not ledger.has_table("no_such_table")


def test_counts_per_day_split_by_status_and_backfill(ledger):
    billing_ledger(ledger)
    counts = {(str(r["day"])[:10], r["destination"], r["status"], bool(r["backfill"])): r["n"]
              for r in ledger.counts_per_day()}
    assert counts == {(DAY, "orb", "delivered", False): 3, (DAY, "orb", "delivered", True): 1,
                      (DAY, "orb", "rejected", False): 1, (DAY, "orb", "held", False): 1,
                      (DAY, "kable", "delivered", False): 1}


def test_rejected_and_held_events_come_with_their_reason_and_customer(ledger):
    billing_ledger(ledger)
    rows = [(r["destination"], r["status"], r["reason"], r["message_id"], r["customer_id"])
            for r in ledger.rejected_and_held()]
    assert sorted(rows) == [("orb", "held", "in the future", "m-h1", None),
                            ("orb", "rejected", "bad amount", "m-r1", "acme")]


@pytest.mark.parametrize(("customer", "delivered", "names"), [
    (None, {("orb", "acme"): 3, ("kable", "zeta"): 1},
     {("orb", "acme", "api_call"): 2, ("orb", "acme", "login"): 1, ("kable", "zeta", "api_call"): 1}),
    ("acme", {("orb", "acme"): 3}, {("orb", "acme", "api_call"): 2, ("orb", "acme", "login"): 1}),
    ("nobody", {}, {}),
], ids=["every-customer", "one-customer", "unknown-customer"])
def test_deliveries_per_known_customer_and_event_name(ledger, customer, delivered, names):
    billing_ledger(ledger)
    per_customer = ledger.delivered_per_customer(customer)
    assert {(r["destination"], r["customer_id"]): r["n"] for r in per_customer} == delivered
    assert all(r["last"] is not None for r in per_customer)
    assert {(r["destination"], r["customer_id"], r["event_name"]): r["n"]
            for r in ledger.delivered_event_names(customer)} == names


def test_day_counts_findings_and_backfills_of_every_destination(ledger):
    for destination in ("orb", "kable"):
        ledger.record_day_counts(destination, {T0.date(): {"warehouse": 3, "delivered": 2, "rejected": 1, "held": 0}},
                                 RUN_A, T0)
        ledger.record_findings(destination, [{"kind": "not_delivered", "hour": T0, "events": 2}], RUN_A, T0)
    ledger.record_backfill("orb", {"id": "bf_late", "timeframe_start": "2026-11-22T00:00:00Z",
                                   "timeframe_end": "2026-11-23T00:00:00Z"}, RUN_A)
    ledger.record_backfill("orb", {"id": "bf_early", "timeframe_start": "2026-11-20T00:00:00Z",
                                   "timeframe_end": "2026-11-21T00:00:00Z"}, RUN_A)
    assert sorted((r["destination"], str(r["day"])[:10], r["warehouse"]) for r in ledger.day_counts()) == [
        ("kable", DAY, 3), ("orb", DAY, 3)]
    assert [f["destination"] for f in ledger.findings()] == ["orb", "kable"], "oldest first"
    assert [f["destination"] for f in ledger.findings("kable")] == ["kable"]
    assert [b["backfill_id"] for b in ledger.backfill_records()] == ["bf_early", "bf_late"]
    assert ledger.backfill_records("kable") == []


def test_a_mark_of_new_keys_records_every_value_as_given_whatever_characters_it_holds(ledger):
    """Tabs, line breaks and backslashes in a value (array literals and JSON quote them), a NULL
    against an empty string, a missing timestamp: all arrive unchanged."""
    keys = ["plain", "tab\there", "line\nbreak", "back\\slash", "\\N", "crlf\r\n", "ünïcode ✓"]
    customers = ["cus_1", "", None, "c\\d", "\\N", "x\ty", "cus_ü"]
    names = [None, "api_call", "a\nb", "", "n", "\\", "é"]
    stamps = [T0, None, T0, T0, T0, T0, T0]
    run = RunRef("segment_to_orb", "manual__with\ttab\\and\nbreak")
    ledger.mark_delivered("orb", run, EventRefs(keys, [f"m-{k}" for k in keys], ["api_call"] * len(keys), stamps,
                                                customer_ids=customers, event_names=names), T0,
                          Route("backfill", "bf_\\1"))
    for key, customer, name, stamp in zip(keys, customers, names, stamps, strict=True):
        stored = row(ledger, key)
        assert (stored["idempotency_key"], stored["message_id"], stored["customer_id"], stored["event_name"]) == (
            key, f"m-{key}", customer, name), key
        assert (stored["status"], stored["attempts"], stored["run_id"], stored["backfill_id"], stored["mode"]) == (
            "delivered", 1, run.run_id, "bf_\\1", "backfill"), key
        assert (stored["event_timestamp"] is None) == (stamp is None), key
        if stamp is not None:
            assert stored["event_timestamp"].replace(tzinfo=UTC) == stamp, key
        assert stored["delivered_at"].replace(tzinfo=UTC) == T0, key


def test_a_mark_that_meets_a_key_already_in_the_ledger_upserts_the_whole_batch(ledger):
    reject(ledger, RUN_A, "old", "no external customer ID")
    deliver(ledger, RUN_B, ["new-1", "old", "new-2"])
    assert ledger.status_of("orb", ["new-1", "old", "new-2"]) == {
        "new-1": "delivered", "old": "delivered", "new-2": "delivered"}
    assert row(ledger, "old")["attempts"] == 2 and row(ledger, "new-1")["attempts"] == 1
    deliver(ledger, RUN_B, ["new-1"])  # the same keys again: nothing is lost, the attempt counted
    assert row(ledger, "new-1")["attempts"] == 2
