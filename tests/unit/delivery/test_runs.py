"""The delivery core against an in-process destination: exactly once, bisection, partial acceptance,
retries exhausted then recovery, backfill routing, replace and replay. No database server, no HTTP."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from tests.unit.delivery.conftest import NOW, PARTITION, WINDOW, events
from usage_billing.delivery import DeliveryFailed, deliver_window, replace_window, replay_rejected, send_queued, sweep
from usage_billing.delivery.runs import LOADED_SINCE_MARGIN, loaded_since
from usage_billing.sources import Partition, Window


def test_every_event_is_delivered_once_and_a_rerun_sends_nothing(core):
    report = deliver_window(core.job(), PARTITION, WINDOW)
    keys = set(core.source.tables["api_call"]["id"])
    assert set(core.sender.held) == keys
    assert max(core.sender.accepted_counts.values()) == 1
    assert report.accepted == report.sent == len(keys) and report.rejected == 0
    assert set(core.statuses().values()) == {"delivered"}
    requests = core.sender.requests

    again = deliver_window(core.job("run-2"), PARTITION, WINDOW)
    assert core.sender.requests == requests, "a rerun sends nothing"
    assert again.sent == 0 and again.already_delivered == len(keys)


def test_batches_respect_the_batch_size_and_requests_are_counted(core):
    report = deliver_window(core.job(), PARTITION, WINDOW)
    assert core.sender.batches and max(core.sender.batches) <= 50
    assert report.batches == len(core.sender.batches) == report.requests == core.sender.requests


def test_a_batch_refused_whole_is_bisected_and_only_the_bad_events_are_rejected(core):
    core.sender.refuse = lambda event: "amount must be below 6" if event["properties"].get("amount") == 6 else None
    report = deliver_window(core.job(), PARTITION, WINDOW)
    frame = core.source.tables["api_call"]
    bad = set(frame.loc[frame["amount"] == 6, "id"])
    assert bad and set(core.sender.held) == set(frame["id"]) - bad
    statuses = core.statuses()
    assert {k for k, s in statuses.items() if s == "rejected"} == bad
    assert report.destination_rejected == len(bad) and report.bisections > 0
    assert report.requests == core.sender.requests, "every request the transport made is counted"
    (reason, count), = report.reasons.most_common(1)
    assert "amount must be below 6" in reason and count == len(bad)


def test_events_named_in_a_partial_acceptance_are_rejected_the_rest_delivered(core):
    core.sender.reject_individually = True
    core.sender.refuse = lambda event: "unknown customer" if event["external_customer_id"] == "cus_3" else None
    report = deliver_window(core.job(), PARTITION, WINDOW)
    rejected = {k for k, s in core.statuses().items() if s == "rejected"}
    assert len(rejected) == 10 and report.bisections == 0
    assert report.accepted == 290 and report.destination_rejected == 10


def test_retries_exhausted_fail_the_task_after_marking_the_confirmed_part_and_the_next_try_sends_the_rest(core):
    core.sender.fail_requests = {3}
    with pytest.raises(DeliveryFailed, match="not confirmed"):
        deliver_window(core.job(concurrency=1), PARTITION, WINDOW)
    confirmed = {k for k, s in core.statuses().items() if s == "delivered"}
    assert len(confirmed) == 100, "the two batches before the failure"
    assert confirmed == set(core.sender.held), "exactly what the destination confirmed is marked"

    deliver_window(core.job(), PARTITION, WINDOW)  # Airflow's next try
    assert set(core.sender.held) == set(core.source.tables["api_call"]["id"])
    assert max(core.sender.accepted_counts.values()) == 1, "nothing confirmed was sent again"


def test_a_rejected_row_is_left_alone_by_overlapping_windows_until_it_is_loaded_again(core):
    frame = core.source.tables["api_call"].copy()
    frame.loc[frame.index[:5], "user_id"] = pd.NA
    core.source.tables["api_call"] = frame
    first = deliver_window(core.job(), PARTITION, WINDOW)
    assert first.mapping_rejected == 5 and first.rejected_before == 0
    marks = core.attempts()

    again = deliver_window(core.job("run-2"), PARTITION, WINDOW)
    assert again.mapping_rejected == 0 and again.already_delivered == len(frame), "settled: skipped, not re-rejected"
    assert core.attempts() == marks, "nothing marked again"

    # Two rows loaded again, one fixed upstream and one still without a customer, plus the same
    # rows' old copies: the new loads are tried again, the old copies are not.
    reloaded = frame.iloc[:2].copy()
    reloaded["received_at"] = WINDOW.end - timedelta(minutes=1)
    reloaded.loc[reloaded.index[0], "user_id"] = "cus_fixed"
    core.source.tables["api_call"] = pd.concat([frame, reloaded], ignore_index=True)
    third = deliver_window(core.job("run-3"), PARTITION, WINDOW)
    fixed, still = reloaded["id"].tolist()
    assert core.statuses()[fixed] == "delivered" and core.sender.accepted_counts[fixed] == 1
    assert third.mapping_rejected == 1 and third.rejected_before == 1, "the same verdict on the new load, not anew"
    assert "1 already rejected before" in third.render()
    assert core.statuses()[still] == "rejected" and core.attempts()[still] == marks[still] + 1

    fourth = deliver_window(core.job("run-4"), PARTITION, WINDOW)
    assert fourth.sent == fourth.rejected == 0, "the new load is settled too"


def test_events_past_the_grace_period_go_through_one_backfill_per_day(core):
    old = events(40, start=NOW - timedelta(days=2, hours=3), step=timedelta(hours=1), prefix="old")
    old["received_at"] = NOW - timedelta(minutes=30)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    report = deliver_window(core.job(), PARTITION, WINDOW)
    days = {stamp.date() for stamp in old["timestamp"]}
    assert report.backfills == len(core.sender.backfills) == len(days)
    in_backfills = {key for keys in core.sender.in_backfill.values() for key in keys}
    assert in_backfills == set(old["id"]), "only the late events, all of them"
    assert all(b["status"] == "reflected" for b in core.sender.backfills.values())
    assert all(not b["replace_existing_events"] for b in core.sender.backfills.values())
    records = core.ledger.backfill_records("orb")
    assert sorted(r["backfill_id"] for r in records) == sorted(core.sender.backfills)


def late_rows(days: int, per_day: int = 4, prefix: str = "late") -> pd.DataFrame:
    """Rows loaded just now whose events lie on ``days`` earlier UTC days, past Orb's grace period."""
    late = pd.concat([events(per_day, start=(NOW - timedelta(days=day)).replace(hour=1),
                             step=timedelta(hours=20 / per_day), prefix=f"{prefix}{day}-") for day in range(1, days + 1)],
                     ignore_index=True)
    late["received_at"] = NOW - timedelta(minutes=30)
    return late


def test_late_events_of_every_partition_and_chunk_share_one_backfill_per_day_for_the_run(core):
    """Issue 14, item 7: three hash partitions, several chunks each, late events on three days:
    the partitions queue them and the run sends three backfills, not one per partition and chunk."""
    old = late_rows(3, per_day=40)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    job = core.job(backfill_per_run=True)
    reports = [deliver_window(job, Partition("api_call", bucket, 3), WINDOW) for bucket in range(3)]
    assert not core.sender.backfills, "the partitions only queue"
    assert sum(r.queued for r in reports) == len(old)
    assert {s for k, s in core.statuses().items() if k in set(old["id"])} == {"queued"}
    assert "queued            " in reports[0].render()

    sent = send_queued(job)
    days = {stamp.date() for stamp in old["timestamp"]}
    assert sent.backfills == len(core.sender.backfills) == len(days) == 3
    assert {key for keys in core.sender.in_backfill.values() for key in keys} == set(old["id"])
    assert set(core.statuses().values()) == {"delivered"}
    assert max(core.sender.accepted_counts.values()) == 1, "nothing twice"
    assert send_queued(job).backfills == 0, "an empty queue opens no backfill"


def test_without_a_run_level_backfill_task_each_delivery_sends_its_own_queue(core):
    old = late_rows(2)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    report = deliver_window(core.job(), PARTITION, WINDOW)
    assert report.queued == len(old) and report.backfills == 2 and report.sent_in_backfills == len(old)
    assert set(core.statuses().values()) == {"delivered"}


def test_a_queued_event_whose_row_left_the_warehouse_is_rejected_with_that_reason(core):
    old = late_rows(1)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    job = core.job(backfill_per_run=True)
    deliver_window(job, PARTITION, WINDOW)
    gone = old["id"].iloc[0]
    core.source.tables["api_call"] = core.source.tables["api_call"][core.source.tables["api_call"]["id"] != gone]
    send_queued(job)
    assert core.ledger.status_of("orb", [gone]) == {gone: "rejected"}
    (row,) = [r for r in core.ledger.rejected("orb") if r["idempotency_key"] == gone]
    assert "no longer in the warehouse" in row["reason"]
    assert core.ledger.queued("orb") == [], "no day stays queued for ever"


def test_a_months_catch_up_by_the_sweep_opens_one_backfill_per_day(core):
    """What the README states: a month of late rows caught up by the sweep costs one backfill per day."""
    old = late_rows(30, per_day=3)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    report = sweep(core.job(), ["api_call"], Window(NOW - timedelta(days=31), NOW))
    assert report.missing_after == 0
    assert len(core.sender.backfills) == len({stamp.date() for stamp in old["timestamp"]}) == 30


def test_a_destination_without_backfills_sends_old_events_live(core):
    core.name = "kable"
    old = events(10, start=NOW - timedelta(days=2), prefix="old")
    old["received_at"] = NOW - timedelta(minutes=30)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    report = deliver_window(core.job(), PARTITION, WINDOW)
    assert report.backfills == 0 and not core.sender.backfills
    assert set(old["id"]) <= set(core.sender.held)


def test_replace_resends_every_event_of_the_period_into_one_replacing_backfill(core):
    deliver_window(core.job(), PARTITION, WINDOW)
    period = Window(NOW - timedelta(hours=1), NOW - timedelta(minutes=30))
    report = replace_window(core.job("replace"), ["api_call"], period)
    (backfill,) = core.sender.backfills.values()
    assert backfill["replace_existing_events"] and backfill["status"] == "reflected"
    frame = core.source.tables["api_call"]
    in_period = set(frame.loc[(frame["timestamp"] >= period.start) & (frame["timestamp"] < period.end), "id"])
    assert set(core.sender.in_backfill[backfill["id"]]) == in_period
    assert report.mode == "replace" and report.accepted == len(in_period)
    assert "replacing backfill" in report.render() and "lateness" not in report.render()
    key = sorted(in_period)[0]
    assert [h["mode"] for h in core.ledger.history_of("orb", key)] == ["ingest"]


def test_replace_is_refused_for_a_destination_without_backfills(core):
    core.name = "kable"
    with pytest.raises(ValueError, match="needs backfills"):
        replace_window(core.job(), ["api_call"], WINDOW)


def test_replay_resends_fixed_rejections_under_their_original_keys(core):
    frame = core.source.tables["api_call"].copy()
    frame.loc[frame.index[:5], "user_id"] = pd.NA
    core.source.tables["api_call"] = frame
    deliver_window(core.job(), PARTITION, WINDOW)
    rejected = {k for k, s in core.statuses().items() if s == "rejected"}
    assert len(rejected) == 5
    fixed = frame.copy()
    fixed.loc[fixed.index[:5], "user_id"] = "cus_fixed"  # fixed in place: same load, same loaded-at
    core.source.tables["api_call"] = fixed
    # A month later: the rows are far behind any window, found by id (from their recorded load on).
    report = replay_rejected(core.job("replay", now=lambda: NOW + timedelta(days=30)), "api_call", "customer")
    assert report.accepted == 5 and rejected <= set(core.sender.held)
    assert all(core.sender.held[k]["external_customer_id"] == "cus_fixed" for k in rejected)
    assert set(core.statuses().values()) == {"delivered"}


def test_progress_lines_follow_the_injected_clock(core, caplog):
    ticks = iter(range(0, 10_000, 40))
    caplog.set_level("INFO", logger="usage_billing.delivery.sending")
    deliver_window(dataclasses.replace(core.job(), clock=lambda: next(ticks)), PARTITION, WINDOW)
    progress = [r.message for r in caplog.records if r.message.startswith("progress:")]
    assert progress and "sent" in progress[-1]


def test_the_report_times_the_delivery_with_the_injected_clock(core):
    readings = iter([1000.0])
    report = deliver_window(dataclasses.replace(core.job(), clock=lambda: next(readings, 1012.5)), PARTITION, WINDOW)
    assert report.seconds == 12.5
    assert "duration          12.5 s" in report.render()


def test_an_event_stamped_too_far_ahead_is_held_then_delivered_once_due(core):
    future = events(3, start=NOW + timedelta(hours=2), prefix="future")
    future["received_at"] = NOW - timedelta(minutes=10)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], future], ignore_index=True)
    report = deliver_window(core.job(), PARTITION, WINDOW)
    keys = set(future["id"])
    assert report.held == 3 and report.rejected == 0 and not keys & set(core.sender.held)
    assert {core.statuses()[k] for k in keys} == {"held"}
    assert "held              3" in report.render()

    # Hours later the rows are far behind any window's lookback: the held events are found by id.
    later = NOW + timedelta(hours=3)
    window = Window(later - timedelta(hours=1), later)
    again = deliver_window(core.job("later", now=lambda: later), PARTITION, window)
    assert keys <= set(core.sender.held) and again.held == 0
    assert {core.statuses()[k] for k in keys} == {"delivered"}
    assert max(core.sender.accepted_counts.values()) == 1
    assert any("held events now due" in note for note in again.notes)


def test_held_events_are_not_sent_by_other_hash_buckets(core):
    future = events(2, start=NOW + timedelta(hours=2), prefix="future")
    future["received_at"] = NOW - timedelta(minutes=10)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], future], ignore_index=True)
    for bucket in range(2):
        deliver_window(core.job(), Partition("api_call", bucket, 2), WINDOW)
    later = NOW + timedelta(hours=3)
    requests = core.sender.requests
    deliver_window(core.job("later", now=lambda: later), Partition("api_call", 1, 2), Window(later, later))
    assert core.sender.requests == requests, "bucket 1 leaves the due held events to bucket 0"
    deliver_window(core.job("later", now=lambda: later), Partition("api_call", 0, 2), Window(later, later))
    assert set(future["id"]) <= set(core.sender.held)


def test_events_of_a_customer_orb_does_not_have_are_sent_and_the_customer_named(core):
    core.sender.customers = {f"cus_{i}" for i in range(30) if i != 7}
    report = deliver_window(core.job(), PARTITION, WINDOW)
    assert report.unknown_customers == {"cus_7": 10}
    assert report.accepted == 300, "sent anyway: Orb attributes them once the customer exists"
    assert "unknown customers 10 events of 1 customers orb does not have: cus_7 (10)" in report.render()


def test_with_unknown_customers_hold_their_events_wait_until_the_customer_exists(core):
    core.overrides = {"unknown_customers": "hold"}
    core.sender.customers = {f"cus_{i}" for i in range(30) if i != 7}
    report = deliver_window(core.job(), PARTITION, WINDOW)
    strays = {k for k in core.source.tables["api_call"]["id"] if int(k[1:]) // 10 == 7}
    assert report.held == 10 and report.accepted == 290 and not strays & set(core.sender.held)
    assert {core.statuses()[k] for k in strays} == {"held"}

    deliver_window(core.job("next-hour"), PARTITION, Window(NOW, NOW))  # still unknown: still held
    assert not strays & set(core.sender.held)
    core.sender.customers.add("cus_7")
    deliver_window(core.job("after-signup"), PARTITION, Window(NOW, NOW))
    assert strays <= set(core.sender.held) and {core.statuses()[k] for k in strays} == {"delivered"}
    assert max(core.sender.accepted_counts.values()) == 1


def test_kable_has_no_customer_lookup_and_asks_nothing(core):
    core.name = "kable"
    deliver_window(core.job(), PARTITION, WINDOW)
    assert not core.sender.lookups


def test_rejected_and_held_events_keep_their_customer_in_the_ledger(core):
    """The billing view counts rejected and held events per customer from the ledger's customer_id:
    refused by the mapping (a null timestamp), by the destination, or held for a customer it lacks."""
    core.overrides = {"unknown_customers": "hold"}
    core.sender.customers = {f"cus_{i}" for i in range(30) if i != 7}
    core.sender.refuse = lambda event: "amount must be below 6" if event["properties"].get("amount") == 6 else None
    frame = core.source.tables["api_call"].copy()
    frame.loc[frame.index[:5], "user_id"] = pd.NA
    frame.loc[frame.index[10:13], "timestamp"] = pd.NaT
    core.source.tables["api_call"] = frame
    deliver_window(core.job(), PARTITION, WINDOW)
    t = core.ledger.table.c
    with core.ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(t.idempotency_key, t.status, t.reason, t.customer_id)
                            .where(t.status.in_(("rejected", "held")))).all()
    kinds = {("held" if r.status == "held" else "orb" if r.reason.startswith("orb rejected") else "mapping")
             for r in rows}
    assert kinds == {"mapping", "orb", "held"}, "every path that refuses an event"
    customer = {key: None if int(key[1:]) < 5 else f"cus_{int(key[1:]) // 10}" for key in frame["id"]}
    assert {r.idempotency_key: r.customer_id for r in rows} == {r.idempotency_key: customer[r.idempotency_key]
                                                                for r in rows}
    assert {r.customer_id for r in rows if r.status == "held"} == {"cus_7"}


def recording_reads(core) -> list:
    """Every ReadRequest the core sends the source from now on."""
    requests, read = [], core.source.read
    core.source.read = lambda request: requests.append(request) or read(request)
    return requests


def test_queued_events_are_read_back_from_the_earliest_load_the_ledger_recorded_and_a_reload_is_found(core):
    """Issue 12 cost guard: the backfill task reads its queue by id, pruned on the loaded-at column
    from the ledger's row_loaded_at; a row loaded again since (later loaded-at) is still the one sent."""
    old = late_rows(2)
    old["received_at"] = [NOW - timedelta(minutes=50 - i) for i in range(len(old))]
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], old], ignore_index=True)
    job = core.job(backfill_per_run=True)
    deliver_window(job, PARTITION, WINDOW)
    assert {s for k, s in core.statuses().items() if k in set(old["id"])} == {"queued"}
    reloaded = old.iloc[[0]].copy()
    reloaded["received_at"], reloaded["amount"] = NOW - timedelta(minutes=5), 6  # loaded again, changed upstream
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], reloaded], ignore_index=True)

    requests = recording_reads(core)
    sent = send_queued(job)
    by_id = [r for r in requests if r.ids is not None]
    assert len(by_id) == 2, "one read per UTC day of the queue"
    days = old.groupby(old["timestamp"].dt.date)["received_at"].min()
    assert sorted(r.loaded_since for r in by_id) == sorted(t - LOADED_SINCE_MARGIN for t in days), \
        "each day's read starts at the earliest load recorded for its events"
    assert sent.accepted == len(old) and set(core.statuses().values()) == {"delivered"}
    assert core.sender.held[reloaded["id"].iloc[0]]["properties"]["amount"] == 6, "the later load was sent"
    assert any("read from rows loaded since" in note for note in sent.notes)


def test_held_events_coming_due_are_read_back_from_their_recorded_load(core):
    future = events(3, start=NOW + timedelta(hours=2), prefix="future")
    future["received_at"] = NOW - timedelta(minutes=10)
    core.source.tables["api_call"] = pd.concat([core.source.tables["api_call"], future], ignore_index=True)
    deliver_window(core.job(), PARTITION, WINDOW)
    requests = recording_reads(core)
    later = NOW + timedelta(hours=3)
    deliver_window(core.job("later", now=lambda: later), PARTITION, Window(later - timedelta(hours=1), later))
    (by_id,) = [r for r in requests if r.ids is not None]
    assert sorted(by_id.ids) == sorted(future["id"])
    assert by_id.loaded_since == NOW - timedelta(minutes=10) - LOADED_SINCE_MARGIN


def test_a_replay_of_rejections_recorded_without_a_load_reads_unpruned_and_says_so(core):
    frame = core.source.tables["api_call"].copy()
    frame.loc[frame.index[:5], "user_id"] = pd.NA
    core.source.tables["api_call"] = frame
    deliver_window(core.job(), PARTITION, WINDOW)
    t = core.ledger.table.c
    with core.ledger.engine.begin() as conn:  # as a ledger row written before revision 0007
        conn.execute(core.ledger.table.update().where(t.idempotency_key == frame["id"].iloc[0])
                     .values(row_loaded_at=None))
    requests = recording_reads(core)
    report = replay_rejected(core.job("replay"), "api_call")
    (by_id,) = [r for r in requests if r.ids is not None]
    assert by_id.loaded_since is None, "one unknown load: no bound is sound"
    assert any("1 of 5 chosen events have no loaded-at in the ledger" in note for note in report.notes)
    assert "note: 1 of 5 chosen events" in report.render()


@pytest.mark.parametrize(("loads", "expected"), [
    ([NOW, NOW - timedelta(hours=1)], NOW - timedelta(hours=1) - LOADED_SINCE_MARGIN),
    ([NOW, None], None),
    ([], None),
], ids=["earliest less the margin", "one unknown", "none"])
def test_loaded_since_is_the_earliest_recorded_load_or_none(loads, expected):
    assert loaded_since(loads) == expected
