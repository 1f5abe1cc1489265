"""Settings name fields the Segment way; these are the warehouse columns they resolve to."""

from __future__ import annotations

import pytest

from usage_billing.sources.layout import column_for, is_property_column, property_column


@pytest.mark.parametrize(("field", "column"), [
    ("userId", "user_id"), ("anonymousId", "anonymous_id"), ("messageId", "id"), ("event", "event_text"),
    ("timestamp", "timestamp"), ("receivedAt", "received_at"), ("amount", "amount"),
    ("properties.amount", "amount"), ("latencyMs", "latency_ms"), ("plan.tier", "plan_tier"),
    ("properties.plan.tier", "plan_tier"), ("context.traits.accountId", "context_traits_account_id"),
    ("context.groupId", "context_group_id"), ("properties.customerId", "customer_id"),
], ids=lambda value: value)
def test_column_for(field, column):
    assert column_for(field) == column


@pytest.mark.parametrize(("path", "column"), [
    ("messageId", "message_id"), ("segmentX", "segment_x"), ("nested.field", "nested_field"),
    ("properties.statusCode", "status_code"), ("context.traits.plan", "context_traits_plan"),
], ids=["messageId-is-a-property-in-a-mapping", "camelCase", "nested", "properties-prefix", "context-path"])
def test_property_column(path, column):
    assert property_column(path) == column


@pytest.mark.parametrize(("column", "expected"), [
    ("amount", True), ("plan_tier", True), ("id", False), ("user_id", False), ("event_text", False),
    ("context_ip", False), ("uuid_ts", False), ("received_at", False), ("_copies", False),
])
def test_is_property_column(column, expected):
    assert is_property_column(column) is expected


def test_empty_field_is_refused():
    with pytest.raises(ValueError, match="empty field name"):
        column_for("  ")
