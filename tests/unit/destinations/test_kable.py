"""Every rule of Segment's Kable destination, as named cases (segment-kable-destination.md)."""

from __future__ import annotations

import math

import pytest

from tests.unit.destinations.conftest import segment_frame
from usage_billing.destinations.kable import KableSettings
from usage_billing.destinations.kable import mapping as kable


def settings(**overrides) -> KableSettings:
    return KableSettings(**overrides)


def only_event(rows, now, **overrides) -> dict:
    mapped = kable.map_events(segment_frame(rows), settings(**overrides), now)
    assert not mapped.rejected, mapped.rejected
    assert len(mapped.payloads) == 1
    return mapped.payloads[0]


def test_doc_example_segmentX_to_kableX_with_pass_through(now):
    """The Kable doc's example: segmentX renamed to kableX, other properties passed through.

    The warehouse stores the properties snake_cased (segment_x, message_id, object_count,
    bank_account_balance); the mapping names them the Segment way and reaches the columns.
    """
    row = {"id": "022bb90c-bbac-11e4-8dfc-aa07a5b093db", "user_id": "yourcompanyuser_1234567890",
           "event_text": "your_event_type", "timestamp": "2022-01-09T09:32:01Z",
           "segment_x": "important data point", "message_id": "msg_ABC123XYZ456", "object_count": 12,
           "bank_account_balance": 399.99}
    event = only_event([row], now, properties_mappings={"segmentX": "kableX", "objectCount": "objectCount",
                                                        "messageId": "messageId",
                                                        "bankAccountBalance": "bankAccountBalance"})
    assert event == {
        "clientId": "yourcompanyuser_1234567890",
        "timestamp": "2022-01-09T09:32:01.000Z",
        "transactionId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
        "data": {"kableX": "important data point", "objectCount": 12, "messageId": "msg_ABC123XYZ456",
                 "bankAccountBalance": 399.99},
    }


@pytest.mark.parametrize(("row", "mappings", "expected"), [
    ({"segment_x": "v"}, {"segmentX": "kableX"}, {"kableX": "v"}),
    ({"nested_field": 7}, {"nested.field": "dimension"}, {"dimension": 7}),
    ({"status_code": 200, "endpoint": "/v1"}, {"statusCode": "status"}, {"status": 200, "endpoint": "/v1"}),
    ({"object_count": 12}, {}, {"object_count": 12}),
    ({"bytes": None, "endpoint": "/v1"}, {}, {"endpoint": "/v1"}),
    ({"plan_tier": "pro"}, {"plan.tier": "tier"}, {"tier": "pro"}),
    ({"plan_tier": "pro"}, {"properties.plan.tier": "tier"}, {"tier": "pro"}),
    ({"count": 3}, {}, {"count": 3}),
], ids=[
    "mapped-key-renamed-segmentX-to-kableX",
    "nested-field-dot-notation-to-dimension",
    "mapped-renamed-unmapped-passed-through",
    "unmapped-passed-through-under-its-column-name",
    "null-values-omitted",
    "plan.tier-reaches-flattened-plan_tier",
    "properties-prefix-accepted",
    "integers-stay-integers",
])
def test_data_mapping(row, mappings, expected, now):
    assert only_event([row], now, properties_mappings=mappings)["data"] == expected


def test_renamed_source_key_does_not_also_pass_through(now):
    data = only_event([{"segment_x": "v", "other": 1}], now, properties_mappings={"segmentX": "kableX"})["data"]
    assert "segment_x" not in data and data == {"kableX": "v", "other": 1}


def test_segment_fields_are_not_properties(now):
    data = only_event([{"context_ip": "1.2.3.4", "received_at": "2026-11-23T11:30:02Z", "amount": 1.5}],
                      now)["data"]
    assert data == {"amount": 1.5}


@pytest.mark.parametrize(("rows", "overrides", "field", "expected"), [
    ([{"user_id": "cus_1"}], {}, "clientId", "cus_1"),
    ([{"context_group_id": "grp_9"}], {"client_id_field": "context.groupId"}, "clientId", "grp_9"),
    ([{"customer_id": "c-7"}], {"client_id_field": "properties.customerId"}, "clientId", "c-7"),
    ([{"id": "ajs-55"}], {}, "transactionId", "ajs-55"),
    ([{"timestamp": "2026-11-23T13:30:00+02:00"}], {}, "timestamp", "2026-11-23T11:30:00.000Z"),
], ids=[
    "clientId-defaults-to-userId",
    "client_id_field-context-dot-notation",
    "client_id_field-properties-dot-notation",
    "transactionId-is-messageId",
    "timestamp-rfc3339-utc",
])
def test_identity_and_time(rows, overrides, field, expected, now):
    assert only_event(rows, now, **overrides)[field] == expected


def test_event_name_key_adds_the_event_name_to_data(now):
    event = only_event([{"event_text": "Tokens Used", "input_tokens": 5}], now, event_name_key="event")
    assert event["data"] == {"input_tokens": 5, "event": "Tokens Used"}


def test_without_event_name_key_the_event_name_is_not_sent(now):
    event = only_event([{"event_text": "Tokens Used", "input_tokens": 5}], now)
    assert "event" not in event["data"] and "Tokens Used" not in event["data"].values()


@pytest.mark.parametrize(("row", "reason"), [
    ({"user_id": None, "anonymous_id": "anon"}, "no client ID: client_id_field 'userId' (column user_id) is empty"),
    ({"id": None}, "messageId (column id) is empty"),
    ({"timestamp": None}, "timestamp is null"),
    ({"latency_ms": math.inf}, "property latency_ms: number inf is not finite"),
    ({"note": "bad \udc80"}, "property note: text is not valid UTF-8"),
], ids=["no-client-id", "no-message-id", "no-timestamp", "infinite-number", "invalid-utf8"])
def test_rejections(row, reason, now):
    mapped = kable.map_events(segment_frame([{"id": "good"}, {"id": "bad", **row}]), settings(), now)
    assert [p["transactionId"] for p in mapped.payloads] == ["good"]
    assert len(mapped.rejected) == 1 and reason in mapped.rejected[0].reason


@pytest.mark.parametrize(("row", "overrides", "customer"), [
    ({"latency_ms": math.inf}, {}, "cus_acme"),
    ({"id": None}, {}, "cus_acme"),
    ({"timestamp": "2026-11-23T13:00:00Z"}, {"future_event_limit": "45m"}, "cus_acme"),
    ({"context_group_id": "grp_7", "timestamp": None}, {"client_id_field": "context.groupId"}, "grp_7"),
    ({"user_id": None, "anonymous_id": "anon"}, {}, None),
    ({"user_id": ""}, {}, None),
], ids=[
    "bad-property-keeps-its-client",
    "missing-message-id-keeps-its-client",
    "held-future-event-keeps-its-client",
    "client-from-a-nested-field",
    "anonymous-event-has-none",
    "empty-client-id-is-none",
])
def test_a_refused_row_carries_its_client_id_when_it_has_one(row, overrides, customer, now):
    """For the billing view's per-customer rejected and held counts."""
    mapped = kable.map_events(segment_frame([{"id": "good"}, {"id": "bad", **row}]), settings(**overrides), now)
    (refused,) = [r for r in [*mapped.rejected, *mapped.held] if r.message_id != "good"]
    assert refused.customer == customer


def test_nested_json_values_pass_through(now):
    """Kable's data is free JSON; a JSON column from the warehouse is passed as is."""
    event = only_event([{"meta": {"a": 1}}], now)
    assert event["data"] == {"meta": {"a": 1}}


def test_future_events_are_sent_as_segments_destination_sends_them(now):
    """Kable documents no future limit and Segment's Kable destination forwards such events."""
    mapped = kable.map_events(segment_frame([{"id": "ajs-1", "timestamp": "2027-01-01T00:00:00Z"}]), settings(), now)
    assert [p["transactionId"] for p in mapped.payloads] == ["ajs-1"] and not mapped.held


def test_a_future_event_limit_holds_events_beyond_it(now):
    mapped = kable.map_events(segment_frame([{"id": "ajs-1", "timestamp": "2026-11-23T13:00:00Z"},
                                             {"id": "ajs-2", "timestamp": "2026-11-23T12:30:00Z"}]),
                              settings(future_event_limit="45m"), now)
    assert [h.key for h in mapped.held] == ["ajs-1"]
    assert [p["transactionId"] for p in mapped.payloads] == ["ajs-2"]
