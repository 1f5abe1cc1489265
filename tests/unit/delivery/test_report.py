"""The task summary: what adds up across reports, and how a replace or a rejection is worded."""

from __future__ import annotations

from collections import Counter

from usage_billing.delivery.report import DeliveryReport, lateness_summary


def test_reports_add_up_and_keep_the_templates_labels():
    a = DeliveryReport("orb", "api_call", "w", unique_events=10, accepted=8, mapping_rejected=2, rejected_before=1,
                       held=1, requests=3, retries=1, reasons=Counter({"no customer": 2}),
                       unknown_customers=Counter({"cus_x": 2}))
    b = DeliveryReport("orb", "tokens_used", "w", unique_events=5, accepted=5, requests=1)
    total = DeliveryReport.combine([a, b], DeliveryReport("orb", "all", "period", mode="replace"))
    assert (total.unique_events, total.accepted, total.rejected, total.held, total.requests) == (15, 13, 2, 1, 4)
    assert total.mode == "replace" and total.partition == "all"
    assert total.reasons == {"no customer": 2} and total.unknown_customers == {"cus_x": 2}


def test_the_summary_splits_new_rejections_from_known_ones():
    report = DeliveryReport("kable", "api_call", "w", mapping_rejected=5, rejected_before=3)
    assert "rejected          5 (2 new, 3 already rejected before" in report.render()


def test_a_replace_says_so_and_never_blames_the_grace_period():
    report = DeliveryReport("orb", "all", "w", mode="replace", accepted=7, backfills=1, sent_in_backfills=7)
    text = report.render()
    assert "all inside 1 replacing backfill" in text and "grace period" not in text


def test_late_events_say_they_went_through_backfills_past_the_grace_period():
    report = DeliveryReport("orb", "api_call", "w", accepted=7, backfills=2, sent_in_backfills=4)
    assert "4 sent inside 2 backfills: older than the grace period" in report.render()


def test_lateness_is_summarised_in_human_units():
    assert lateness_summary([5, 90, 7200]) == {"median": "1.5m", "p99": "2.0h", "max": "2.0h"}
    assert lateness_summary([]) == {}


def test_combined_reports_state_the_tasks_warehouse_cost_once():
    """A task's source counts every query it made; each report carries the running total."""
    first = DeliveryReport("orb", "api_call", "w", cost="1 queries")
    second = DeliveryReport("orb", "tokens_used", "w", cost="2 queries")
    assert DeliveryReport.combine([first, second], first).cost == "2 queries"
