"""What a person sees before approving a replace: the dry run's impact, rendered from its XCom."""

from __future__ import annotations

import pytest

from billing_airflow.operators.approval import MAX_ROWS, approval_body, approval_subject, needs_approval

PREVIEW = {"destination": "orb", "mode": "replace", "start": "2026-11-01T00:00:00+00:00",
           "end": "2026-11-01T02:00:00+00:00", "would_send": 120, "in_backfills": 120, "backfills": 1,
           "already_delivered": 0, "would_reject": 7, "would_hold": 0,
           "by_day_customer_event": [["2026-11-01", "acme", "api_call", 80], ["2026-11-01", "zeta", "tokens_used", 40]],
           "replace_change": [["2026-11-01T00:00", 50, 70], ["2026-11-01T01:00", 60, 50]]}


def test_the_subject_names_the_mode_the_period_and_the_events():
    assert approval_subject(PREVIEW) == ("Re-bill (REPLACE) orb for [2026-11-01T00:00:00+00:00, "
                                         "2026-11-01T02:00:00+00:00): 120 events")


def test_the_body_shows_what_would_be_sent_the_backfill_and_the_hourly_change():
    body = approval_body(PREVIEW)
    assert "events that would be sent: **120**" in body
    assert "through backfills: **120** events in 1 backfill(s)" in body
    assert "would be rejected: 7" in body
    assert "| 2026-11-01T00:00 | 50 | 70 | +20 |" in body and "| 2026-11-01T01:00 | 60 | 50 | -10 |" in body
    assert "| 2026-11-01 | acme | api_call | 80 |" in body
    assert "for all customers" in body, "a replace says it replaces everything in the period"


def test_a_replace_that_changes_nothing_says_so():
    assert "no hour changes" in approval_body({**PREVIEW, "replace_change": []})


def test_long_tables_are_cut_with_a_count_of_what_is_left_out():
    rows = [["2026-11-01", f"c{i}", "api_call", 1] for i in range(MAX_ROWS + 5)]
    body = approval_body({**PREVIEW, "by_day_customer_event": rows})
    assert "... 5 more rows" in body and f"| c{MAX_ROWS} |" not in body


@pytest.mark.parametrize(("run_type", "would_send", "threshold", "held"), [
    ("backfill", 101, 100, True),
    ("backfill", 100, 100, False),
    ("backfill", 10**9, None, False),
    ("scheduled", 10**9, 100, False),
    ("manual", 10**9, 100, False),
    ("backfill", None, 100, False),
], ids=["backfill_above_threshold", "backfill_at_threshold", "no_threshold", "scheduled_never_held",
        "manual_never_held", "no_preview"])
def test_only_a_backfill_run_above_the_threshold_waits_for_approval(run_type, would_send, threshold, held):
    assert needs_approval(run_type, would_send, threshold) is held
