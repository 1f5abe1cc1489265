"""Loud failures for operator mistakes: a configured field no table has, a run rejecting most events."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from billing_airflow.operators.deliver import check_fields, check_rejected_share
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


@pytest.mark.parametrize(("accepted", "rejected", "before", "fails"), [
    (100, 0, 0, False),
    (80, 20, 0, False),
    (70, 30, 0, True),
    (0, 50, 0, True),
    (70, 30, 30, False),
    (0, 0, 0, False),
], ids=["clean", "at-the-limit", "above-the-limit", "everything-rejected", "old-rejections-seen-again", "empty"])
def test_a_run_rejecting_more_than_the_share_fails(accepted, rejected, before, fails):
    total = Counter(accepted=accepted, rejected=rejected, rejected_before=before)
    reasons = Counter({"no external customer ID": rejected})
    if fails:
        with pytest.raises(RuntimeError, match=r"more than destinations\.orb\.max_rejected_share \(25%\)"):
            check_rejected_share("orb", total, reasons, settings())
    else:
        check_rejected_share("orb", total, reasons, settings())
