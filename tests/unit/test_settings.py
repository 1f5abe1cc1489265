"""The configuration file: accepted as documented, and every bad setting named."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from usage_billing.settings import ConfigError, load_settings, parse_duration, parse_settings

ISSUE_EXAMPLE = """
source:
  conn_id: segment_warehouse
  layout: segment_event_tables   # Segment Warehouses layout: one table per event
  schema: prod_api
  events: [api_call, payment_confirmed, tokens_used]
  loaded_at_column: received_at  # uuid_ts and loaded_at are common too
  lookback: 6h                   # re-scan window for late-loaded rows; the ledger makes it safe
ledger:
  conn_id: segment_warehouse     # schema usage_billing in that database
destinations:
  orb:
    conn_id: orb_default
    event_name_field: event
    external_customer_id_field: userId
    idempotency_key_field: messageId
    properties_mapping: {amount: amount, currency: currency, latencyMs: latency_ms, bytes: bytes}
"""

KABLE_EXAMPLE = """
  kable:
    conn_id: kable_default        # host https://live.kable.io or https://test.kable.io,
                                  # login = Kable client ID (kci_...), password = API key (sk_live/sk_test...)
    client_id_field: userId       # default userId; dot notation for nested fields
    properties_mappings: {statusCode: status, plan.tier: tier}
"""


def test_the_documented_orb_configuration_is_accepted_unchanged():
    settings = parse_settings(yaml.safe_load(ISSUE_EXAMPLE))
    assert settings.source.schema_ == "prod_api"
    assert settings.source.lookback == timedelta(hours=6)
    assert settings.ledger.schema_ == "usage_billing"
    orb = settings.destinations.orb
    assert orb.properties_mapping == {"amount": "amount", "currency": "currency", "latencyMs": "latency_ms",
                                      "bytes": "bytes"}
    assert orb.batch_size == 500 and orb.requests_per_second == 100 and orb.events_per_minute == 10_000
    assert settings.destinations.kable is None


def test_the_documented_kable_configuration_is_accepted_unchanged():
    settings = parse_settings(yaml.safe_load(ISSUE_EXAMPLE + KABLE_EXAMPLE))
    kable = settings.destinations.kable
    assert kable.client_id_field == "userId"
    assert kable.properties_mappings == {"statusCode": "status", "plan.tier": "tier"}


def test_the_shipped_default_file_loads():
    settings = load_settings()
    assert settings.destinations.orb is not None and settings.destinations.kable is not None


def test_the_path_comes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "billing.yaml"
    path.write_text(ISSUE_EXAMPLE)
    monkeypatch.setenv("USAGE_BILLING_CONFIG", str(path))
    assert load_settings().destinations.kable is None


def _with(path: str, value):
    data = yaml.safe_load(ISSUE_EXAMPLE)
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(("path", "value", "message"), [
    ("destinations.orb.external_customer_id_field", KeyError, "destinations.orb.external_customer_id_field: Field required"),
    ("destinations.orb.properties_mapping", {"amount": 1}, "properties_mapping: the value for 'amount' must be a non-empty string"),
    ("destinations.orb.properties_mapping", ["amount"], "destinations.orb.properties_mapping: expected a mapping"),
    ("destinations.orb.properties_mapping", {"a": "x", "b": "x"}, "several keys map to the same name ['x']"),
    ("destinations.orb.batch_size", 501, "destinations.orb.batch_size: Input should be less than or equal to 500"),
    ("destinations.orb.idempotency_key_fld", "messageId", "destinations.orb.idempotency_key_fld: Extra inputs are not permitted"),
    ("source.lookback", "six hours", "source.lookback: expected a duration like 90s, 30m, 6h or 7d"),
    ("source.schema", "prod; drop table x", "source.schema: identifier: 'prod; drop table x' is not a valid SQL identifier"),
    ("source.events", ["api_call", "api call"], "source.events: event table: 'api call' is not a valid SQL identifier"),
    ("source.events", [], "source.events: List should have at least 1 item"),
    ("source.layout", "tracks_table", "source.layout: Input should be 'segment_event_tables'"),
    ("destinations", {}, "destinations: configure at least one destination"),
], ids=[
    "missing-external-customer-id-field",
    "non-string-mapping-value",
    "mapping-not-a-map",
    "two-keys-same-target",
    "batch-over-500",
    "misspelt-setting",
    "bad-duration",
    "sql-injection-in-schema",
    "bad-event-table-name",
    "no-events",
    "unknown-layout",
    "no-destination",
])
def test_bad_settings_are_named(path, value, message):
    with pytest.raises(ConfigError) as error:
        parse_settings(_with(path, value), "billing.yaml")
    assert str(error.value).startswith("billing.yaml: ")
    assert message in str(error.value)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_settings(path)


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the configuration file.*USAGE_BILLING_CONFIG"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "expected"), [
    ("6h", timedelta(hours=6)), ("30m", timedelta(minutes=30)), ("90s", timedelta(seconds=90)),
    ("7d", timedelta(days=7)), (3600, timedelta(hours=1)), ("1.5h", timedelta(minutes=90)),
], ids=["hours", "minutes", "seconds", "days", "number-of-seconds", "fractional"])
def test_durations(text, expected):
    assert parse_duration(text) == expected
