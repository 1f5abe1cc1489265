"""Every rule of Segment's Orb destination, as named cases (segment-orb-destination.md)."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from tests.unit.destinations.conftest import segment_frame
from usage_billing.destinations.orb import OrbSettings
from usage_billing.destinations.orb import mapping as orb


def settings(**overrides) -> OrbSettings:
    values = {"external_customer_id_field": "userId",
              "properties_mapping": {"amount": "amount", "latencyMs": "latency_ms", "bytes": "bytes"}}
    return OrbSettings(**{**values, **overrides})


def only_event(rows, now, **overrides) -> dict:
    mapped = orb.map_events(segment_frame(rows), settings(**overrides), now)
    assert not mapped.rejected, mapped.rejected
    assert len(mapped.payloads) == 1
    return mapped.payloads[0]


def test_doc_example_payment_confirmed(now):
    """The Segment doc's payment_confirmed call, with a properties mapping."""
    event = only_event([{"id": "msg-1", "event_text": "payment_confirmed", "user_id": "external_customer_id",
                         "amount": 100.00, "currency": "USD",
                         "confirmation_time": "2022-05-11T21:33:13.1652304793Z"}], now,
                       properties_mapping={"amount": "amount", "currency": "currency"})
    assert event == {"event_name": "payment_confirmed", "idempotency_key": "msg-1",
                     "external_customer_id": "external_customer_id", "timestamp": "2026-11-23T11:30:00.123Z",
                     "properties": {"amount": 100.0, "currency": "USD"}}


@pytest.mark.parametrize(("rows", "overrides", "field", "expected"), [
    ([{"event_text": "API Call", "event": "api_call"}], {}, "event_name", "API Call"),
    ([{"plan_tier": "pro"}], {"event_name_field": "properties.plan.tier"}, "event_name", "pro"),
    ([{"id": "ajs-9"}], {}, "idempotency_key", "ajs-9"),
    ([{"request_id": "req-7"}], {"idempotency_key_field": "requestId"}, "idempotency_key", "req-7"),
    ([{"user_id": "cus_1"}], {}, "external_customer_id", "cus_1"),
    ([{"context_traits_account_id": "acct_3"}], {"external_customer_id_field": "context.traits.accountId"},
     "external_customer_id", "acct_3"),
    ([{"account_number": 42}], {"external_customer_id_field": "properties.accountNumber"},
     "external_customer_id", "42"),
    ([{"timestamp": "2026-11-23T13:30:00+02:00"}], {}, "timestamp", "2026-11-23T11:30:00.000Z"),
], ids=[
    "event_name-defaults-to-original-event-name-not-slug",
    "event_name_field-dot-notation",
    "idempotency_key-defaults-to-messageId",
    "idempotency_key_field-custom-property",
    "external_customer_id-from-userId",
    "external_customer_id-from-context-traits",
    "external_customer_id-number-becomes-string",
    "timestamp-converted-to-utc-with-Z",
])
def test_field_settings(rows, overrides, field, expected, now):
    assert only_event(rows, now, **overrides)[field] == expected


@pytest.mark.parametrize(("row", "mapping", "expected"), [
    ({"amount": 12.5, "endpoint": "/v1/x"}, {"amount": "amount"}, {"amount": 12.5}),
    ({"latency_ms": 87}, {"latencyMs": "latency_ms"}, {"latency_ms": 87}),
    ({"latency_ms": 87}, {"properties.latencyMs": "ms"}, {"ms": 87}),
    ({"plan_tier": "pro"}, {"plan.tier": "tier"}, {"tier": "pro"}),
    ({"bytes": None, "amount": 1.5}, {"bytes": "bytes", "amount": "amount"}, {"amount": 1.5}),
    ({"amount": 3}, {"amount": "amount"}, {"amount": 3}),
    ({"is_trial": True}, {"isTrial": "is_trial"}, {"is_trial": True}),
    ({"region": "eu"}, {"currency": "currency"}, {}),
    ({"amount": Decimal("12.00")}, {"amount": "amount"}, {"amount": 12}),
    ({"amount": Decimal("12.50")}, {"amount": "amount"}, {"amount": 12.5}),
], ids=[
    "unmapped-keys-dropped",
    "mapped-key-kept",
    "properties-prefix-and-rename",
    "nested-dot-notation-reaches-flattened-column",
    "null-values-omitted",
    "integers-stay-integers",
    "booleans-kept",
    "mapped-column-absent-from-table-omitted",
    "integral-decimal-becomes-integer",
    "fractional-decimal-becomes-float",
])
def test_properties_mapping(row, mapping, expected, now):
    assert only_event([row], now, properties_mapping=mapping)["properties"] == expected


def test_integers_stay_integers_in_a_sparse_column(now):
    """A nullable integer column must not turn 3 into 3.0 because another row is null."""
    mapped = orb.map_events(segment_frame([{"id": "a", "latency_ms": 3}, {"id": "b", "latency_ms": None}]),
                            settings(), now)
    values = [p["properties"].get("latency_ms") for p in mapped.payloads]
    assert values == [3, None]
    assert isinstance(values[0], int)


@pytest.mark.parametrize(("row", "reason"), [
    ({"user_id": None, "anonymous_id": "anon-1"}, "no external customer ID: external_customer_id_field 'userId'"),
    ({"user_id": "   "}, "no external customer ID"),
    ({"timestamp": None}, "timestamp is null"),
    ({"event_text": None}, "event_name_field 'event' (column event_text) is empty"),
    ({"id": None}, "idempotency_key_field 'messageId' (column id) is empty"),
    ({"amount": math.inf}, "property amount: number inf is not finite"),
    ({"amount": Decimal(2**70)}, "does not fit in 64 bits"),
    ({"amount": {"value": 1}}, "property amount: nested dict values are not allowed"),
    ({"amount": [1, 2]}, "property amount: nested list values are not allowed"),
    ({"amount": "x" * 513}, "string of 513 characters exceeds max_string_length 512"),
    ({"amount": "bad \ud800 text"}, "property amount: text is not valid UTF-8"),
], ids=[
    "anonymous-event-without-userId",
    "blank-customer-id",
    "missing-timestamp",
    "missing-event-name",
    "missing-idempotency-key",
    "infinite-number",
    "integer-beyond-int64",
    "nested-object-property",
    "array-property",
    "string-over-512-characters",
    "invalid-utf8-surrogate",
])
def test_rejections_name_the_row_and_the_problem(row, reason, now):
    mapped = orb.map_events(segment_frame([{"id": "ajs-ok"}, {"id": "ajs-bad", **row}]), settings(), now)
    assert [p["idempotency_key"] for p in mapped.payloads] == ["ajs-ok"]
    assert len(mapped.rejected) == 1
    rejection = mapped.rejected[0]
    assert rejection.reason.startswith("api_call row id=")
    assert reason in rejection.reason
    assert rejection.key == (row.get("id", "ajs-bad") or "")


@pytest.mark.parametrize(("row", "overrides", "customer"), [
    ({"amount": math.inf}, {}, "cus_acme"),
    ({"timestamp": None}, {}, "cus_acme"),
    ({"id": None}, {}, "cus_acme"),
    ({"timestamp": "2027-01-01T00:00:00Z"}, {}, "cus_acme"),
    ({"account_number": 42, "amount": math.inf}, {"external_customer_id_field": "properties.accountNumber"}, "42"),
    ({"user_id": None, "anonymous_id": "anon-1"}, {}, None),
    ({"user_id": "   "}, {}, None),
    ({"amount": math.inf}, {"external_customer_id_field": "properties.orgId"}, None),
], ids=[
    "bad-property-keeps-its-customer",
    "missing-timestamp-keeps-its-customer",
    "missing-idempotency-key-keeps-its-customer",
    "held-future-event-keeps-its-customer",
    "number-customer-as-the-payload-would-carry-it",
    "anonymous-event-has-none",
    "blank-customer-id-is-none",
    "customer-column-missing-from-table",
])
def test_a_refused_row_carries_its_external_customer_id_when_it_has_one(row, overrides, customer, now):
    """For the billing view's per-customer rejected and held counts."""
    mapped = orb.map_events(segment_frame([{"id": "ajs-ok"}, {"id": "ajs-bad", **row}]), settings(**overrides), now)
    (refused,) = [r for r in [*mapped.rejected, *mapped.held] if r.message_id != "ajs-ok"]
    assert refused.customer == customer


def test_timestamp_within_five_minutes_ahead_is_accepted(now):
    event = only_event([{"timestamp": "2026-11-23T12:04:59Z"}], now)
    assert event["timestamp"] == "2026-11-23T12:04:59.000Z"


def test_customer_id_column_missing_from_table_rejects_every_row_with_the_setting(now):
    frame = segment_frame([{"id": "a"}, {"id": "b"}])
    mapped = orb.map_events(frame, settings(external_customer_id_field="properties.orgId"), now)
    assert not mapped.payloads
    assert {r.reason for r in mapped.rejected} == {
        f"api_call row id={i}: external_customer_id_field 'properties.orgId' (column org_id) does not exist "
        f"in this table" for i in ("a", "b")}


def test_odd_unicode_passes_through(now):
    event = only_event([{"user_id": "cus_ü_漢字", "region": "🚀 ‮rtl"}], now, properties_mapping={"region": "region"})
    assert event["external_customer_id"] == "cus_ü_漢字"
    assert event["properties"] == {"region": "🚀 ‮rtl"}


def test_required_columns_only_reads_what_the_mapping_needs():
    available = ["id", "user_id", "event", "event_text", "timestamp", "received_at", "amount", "endpoint", "secret"]
    assert orb.required_columns(settings(), available) == ["id", "timestamp", "event_text", "event", "user_id",
                                                           "amount"]


def test_mapping_is_pure_pandas():
    import usage_billing.destinations.orb as module

    source = open(module.__file__, encoding="utf-8").read()
    assert "import airflow" not in source and "from airflow" not in source


def test_many_rows_keep_order_and_types(now):
    rows = [{"id": f"m{i}", "amount": float(i), "latency_ms": i} for i in range(1000)]
    mapped = orb.map_events(segment_frame(rows), settings(), now)
    assert mapped.keys == [f"m{i}" for i in range(1000)]
    assert mapped.payloads[7]["properties"] == {"amount": 7.0, "latency_ms": 7}


@pytest.mark.parametrize(("stamp", "held"), [
    ("2026-11-23T12:04:59Z", False),
    ("2026-11-23T12:05:00Z", False),
    ("2026-11-23T12:05:01Z", True),
    ("2027-01-01T00:00:00Z", True),
], ids=["just-inside-5-minutes", "exactly-5-minutes", "just-past-5-minutes", "next-year"])
def test_events_more_than_5_minutes_ahead_are_held_not_rejected(stamp, held, now):
    """Orb refuses events stamped more than 5 minutes ahead; they are held and sent once due."""
    mapped = orb.map_events(segment_frame([{"id": "ajs-1", "timestamp": stamp}]), settings(), now)
    assert not mapped.rejected
    assert [h.key for h in mapped.held] == (["ajs-1"] if held else [])
    assert len(mapped.payloads) == (0 if held else 1)
    if held:
        assert "in the future: held until then" in mapped.held[0].reason and "ajs-1" in mapped.held[0].reason
