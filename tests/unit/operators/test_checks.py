"""Loud failures for operator mistakes: a configured field no table has, a run rejecting most events."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from billing_airflow.operators.deliver import DeliveryReportOperator, check_fields, check_rejected_share
from usage_billing.destinations import get_destination
from usage_billing.settings import ConfigError, parse_settings


def settings(**orb):
    return parse_settings({"source": {"schema": "prod_api", "events": ["api_call", "tokens_used"]},
                           "destinations": {"orb": {"external_customer_id_field": "userId",
                                                    "properties_mapping": {"amount": "amount",
                                                                           "tokens": "tokens"}, **orb}}})


COLUMNS = {"api_call": ["id", "user_id", "timestamp", "amount"], "tokens_used": ["id", "user_id", "timestamp", "tokens"]}


def test_a_customer_field_no_table_has_fails_before_anything_is_sent():
    destination = get_destination("orb", settings(external_customer_id_field="context.traits.acount_id"))
    with pytest.raises(ConfigError, match=r"destinations\.orb: external_customer_id_field "
                                          r"'context\.traits\.acount_id' \(column context_traits_acount_id\)"):
        check_fields(destination, COLUMNS, "prod_api", logging.getLogger("test"))


def test_a_property_of_one_event_type_is_no_news_one_of_none_is_warned(caplog):
    destination = get_destination("orb", settings(properties_mapping={"amount": "amount", "tokenz": "tokens"}))
    with caplog.at_level(logging.WARNING):
        check_fields(destination, COLUMNS, "prod_api", logging.getLogger("test"))
    warned = [r.message for r in caplog.records]
    assert len(warned) == 1 and "'tokenz' (column tokenz)" in warned[0]


@pytest.mark.parametrize(("accepted", "queued", "rejected", "before", "fails"), [
    (100, 0, 0, 0, False),
    (80, 0, 20, 0, False),
    (70, 0, 30, 0, True),
    (0, 0, 50, 0, True),
    (70, 0, 30, 30, False),
    (0, 0, 0, 0, False),
    (0, 960, 26, 0, False),
    (0, 70, 30, 0, True),
], ids=["clean", "at-the-limit", "above-the-limit", "everything-rejected", "old-rejections-seen-again", "empty",
        "queued-for-a-backfill-another-run-sent", "queued-but-above-the-limit"])
def test_a_run_rejecting_more_than_the_share_fails(accepted, queued, rejected, before, fails):
    total = Counter(accepted=accepted, queued=queued, rejected=rejected, rejected_before=before)
    reasons = Counter({"no external customer ID": rejected})
    if fails:
        with pytest.raises(RuntimeError, match=r"more than destinations\.orb\.max_rejected_share \(25%\)"):
            check_rejected_share("orb", total, reasons, settings())
    else:
        check_rejected_share("orb", total, reasons, settings())


class _TaskInstance:
    """The XComs a report task pulls, by task id."""

    def __init__(self, xcoms: dict):
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str):
        return self.xcoms.get(task_ids)


def _report(deliver: list[dict], backfill: dict, monkeypatch) -> dict:
    operator = DeliveryReportOperator(task_id="report", destination="orb", deliver_task_id="deliver",
                                      plan_task_id="plan", backfill_task_id="backfill")
    monkeypatch.setattr(operator, "settings", settings)
    ti = _TaskInstance({"plan": [{"table": r["partition"]} for r in deliver], "deliver": deliver,
                        "backfill": backfill})
    return operator.execute({"ti": ti})


def _partition(table: str, **counts) -> dict:
    return {"partition": table, "unique_events": 2050, **counts}


def test_a_backfill_run_whose_queued_events_another_run_sent_is_not_failed_for_its_few_rejections(monkeypatch):
    """Concurrent runs of a backfill race for each day's queue: this run queued 960 events, another run's
    backfill task took the day first and sent them, and this run's 26 new rejections are 3% of its events."""
    deliver = [_partition("api_call", already_delivered=1680, queued=318, rejected=63, rejected_before=51),
               _partition("payment_confirmed", already_delivered=1656, queued=322, rejected=65, rejected_before=57),
               _partition("tokens_used", already_delivered=1680, queued=320, rejected=57, rejected_before=51)]
    total = _report(deliver, {"partition": "queued", "accepted": 0, "backfills": 0}, monkeypatch)
    assert (total["queued"], total["rejected"] - total["rejected_before"]) == (960, 26)


def test_what_the_backfill_task_sent_for_other_runs_does_not_dilute_this_runs_rejections(monkeypatch):
    deliver = [_partition("api_call", accepted=70, rejected=30)]
    with pytest.raises(RuntimeError, match=r"rejected 30 of 100 events"):
        _report(deliver, {"partition": "queued", "accepted": 960, "backfills": 1}, monkeypatch)
