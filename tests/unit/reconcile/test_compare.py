"""The pure part of reconciliation: which hours are checked by key, and what each difference means."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

import pytest

from usage_billing.reconcile import HourLine, ReconcileReport, choose_hours, hours_between
from usage_billing.reconcile.compare import DISAGREES, EVERY_HOUR, SAMPLE

H = datetime(2026, 11, 23, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(H, H + 3 * HOUR, [H, H + HOUR, H + 2 * HOUR]),
     (H + timedelta(minutes=30), H + HOUR, [H]),
     (H, H + HOUR + timedelta(seconds=1), [H, H + HOUR])],
    ids=["aligned_end_is_exclusive", "unaligned_start_widens_to_its_hour", "unaligned_end_includes_its_hour"],
)
def test_hours_between(start, end, expected):
    assert hours_between(start, end) == expected


def test_an_empty_range_is_refused():
    with pytest.raises(ValueError, match="holds no hour"):
        hours_between(H, H)


def line(**counts) -> HourLine:
    return HourLine(H, **counts)


# (line, explanation fragments, unresolved fragments)
CASES = {
    "all_three_agree": (line(warehouse=60, delivered=60, ledger=60, destination=60), [], []),
    "lost_and_healed": (line(warehouse=60, delivered=60, ledger=60, destination=59, lost=["k"], healed=["k"]),
                        ["1 delivered per the ledger but not held by orb: re-sent under their keys, 1 healed"], []),
    "lost_not_healed": (line(warehouse=60, delivered=60, ledger=60, destination=59, lost=["k"]),
                        ["0 healed"], ["1 events lost by orb were not re-delivered"]),
    "lost_mark": (line(warehouse=60, delivered=59, ledger=59, destination=60, unknown=["k"], unknown_undelivered=1),
                  ["1 held by orb but not delivered per the ledger (a lost mark): reported, not deleted"],
                  ["1 events held by orb are not delivered per the ledger"]),
    "another_ingester": (line(warehouse=60, delivered=60, ledger=60, destination=63),
                         ["3 events in orb match no key of the warehouse or the ledger"],
                         ["orb counts +3 events no key explains"]),
    "not_delivered_yet": (line(warehouse=60, delivered=58, ledger=58, destination=58),
                          ["2 in the warehouse neither delivered nor rejected per the ledger: the sweep delivers them"],
                          ["2 warehouse events are not delivered"]),
    "deleted_from_the_warehouse": (line(warehouse=59, delivered=59, ledger=60, destination=60),
                                   ["1 delivered events are no longer deliverable rows in the warehouse"],
                                   ["1 delivered events are not in the warehouse"]),
    "rejected_is_explained_not_a_disagreement": (line(warehouse=60, delivered=55, rejected=5, ledger=55,
                                                      destination=55), ["5 rejected"], []),
    "no_read_api_compares_warehouse_and_ledger": (line(warehouse=60, delivered=60, ledger=60), [], []),
}


@pytest.mark.parametrize(("hour", "explained", "unresolved"), CASES.values(), ids=CASES.keys())
def test_what_a_difference_means_and_whether_it_fails_the_task(hour, explained, unresolved):
    text = " | ".join(hour.explain("orb"))
    assert all(fragment in text for fragment in explained), text
    assert (text == "") == (not explained)
    problems = " | ".join(hour.unresolved("orb"))
    assert all(fragment in problems for fragment in unresolved), problems
    assert (problems == "") == (not unresolved)


def hours(*lines: HourLine) -> list[HourLine]:
    return [dataclasses.replace(item, hour=H + n * HOUR) for n, item in enumerate(lines)]


def agreeing(count: int = 10) -> HourLine:
    return line(warehouse=count, delivered=count, ledger=count, destination=count)


def test_every_disagreeing_hour_is_checked_and_a_sample_of_the_agreeing_ones():
    lines = hours(agreeing(), line(warehouse=10, delivered=10, ledger=10, destination=9), agreeing(), agreeing(),
                  line(), agreeing())
    choose_hours(lines, 2, random.Random(1))
    assert lines[1].checked == DISAGREES
    assert [x.checked for x in lines].count(SAMPLE) == 2
    assert lines[4].checked == "", "an hour without delivered events has no key to search"


@pytest.mark.parametrize(("sample", "sampled"), [(0, 0), (2, 2), (9, 3)],
                         ids=["no_sample", "two_hours", "more_than_there_are"])
def test_the_sample_size_is_the_setting(sample, sampled):
    lines = hours(agreeing(), agreeing(), agreeing())
    choose_hours(lines, sample, random.Random(0))
    assert [x.checked for x in lines].count(SAMPLE) == sampled


def test_the_same_seed_samples_the_same_hours_so_a_retry_checks_the_same_ones():
    def picked(seed: str) -> list[datetime]:
        lines = hours(*[agreeing() for _ in range(24)])
        choose_hours(lines, 2, random.Random(seed))
        return [x.hour for x in lines if x.checked]

    assert picked("orb:range-1") == picked("orb:range-1")
    assert len({tuple(picked(f"orb:range-{n}")) for n in range(10)}) > 1, "other ranges, other hours"


def test_without_counts_from_the_destination_every_hour_with_events_is_checked():
    lines = hours(line(warehouse=5, delivered=5, ledger=5), line(), line(warehouse=2, delivered=2, ledger=2))
    choose_hours(lines, 0, random.Random(0), every_hour=True)
    assert [x.checked for x in lines] == [EVERY_HOUR, "", EVERY_HOUR]


def test_the_report_table_shows_the_three_sides_and_leaves_out_empty_hours():
    lines = hours(agreeing(60), line(), line(warehouse=60, delivered=60, ledger=60, destination=59, lost=["k"],
                                             healed=["k"], checked=DISAGREES))
    report = ReconcileReport("orb", H, H + 3 * HOUR, "warehouse, ledger and orb", lines)
    text = report.render()
    assert "warehouse  ledger     orb    checked  healed" in text
    assert "2026-11-23 10:00        60      60      60" in text and "agrees" in text
    assert "2026-11-23 12:00        60      60      59  disagrees       1  1 delivered per the ledger" in text
    assert "(1 hours without any event left out)" in text and "result: agrees" in text
    assert report.to_dict()["healed"] == 1 and report.unresolved() == []


def test_the_report_of_a_destination_without_a_read_api_says_so():
    report = ReconcileReport("kable", H, H + HOUR, "warehouse and ledger only: kable has no read API for events",
                             hours(line(warehouse=3, delivered=2, ledger=2)))
    text = report.render()
    assert "kable has no read API" in text and "n/a" in text
    assert "result: DISAGREES, 1 differences remain" in text
    assert report.unresolved() == ["2026-11-23 10:00 1 warehouse events are not delivered"]
