"""The connection type picks the warehouse; warehouse sources never host or join the ledger."""

from __future__ import annotations

import pytest

from usage_billing.settings import DEFAULT_MAXIMUM_BYTES_BILLED, ConfigError, SourceSettings, parse_settings
from usage_billing.sources import SOURCES, kind_for


@pytest.mark.parametrize(("conn_type", "kind"), [
    ("snowflake", "snowflake"), ("google_cloud_platform", "bigquery"), ("redshift", "redshift"),
    ("postgres", "postgres"), ("Snowflake", "snowflake")],
    ids=["snowflake", "bigquery", "redshift", "postgres", "case-insensitive"])
def test_the_connection_type_picks_the_source(conn_type, kind):
    assert kind_for(conn_type).name == kind


@pytest.mark.parametrize("name", ["snowflake", "bigquery", "redshift"])
def test_warehouse_sources_keep_the_ledger_in_postgresql(name):
    assert not SOURCES[name].ledger_join and not SOURCES[name].hosts_ledger


def test_maximum_bytes_billed_is_always_on_100_gib_unless_set_and_positive():
    base = {"schema": "prod_api", "events": ["api_call"]}
    assert SourceSettings.model_validate(base).maximum_bytes_billed == 100 * 2**30 == DEFAULT_MAXIMUM_BYTES_BILLED
    assert SourceSettings.model_validate(base | {"maximum_bytes_billed": 10**12}).maximum_bytes_billed == 10**12
    for off in (0, None):
        with pytest.raises(ValueError, match="maximum_bytes_billed"):
            SourceSettings.model_validate(base | {"maximum_bytes_billed": off})


def test_a_config_file_that_switches_the_byte_cap_off_fails_naming_the_setting():
    with pytest.raises(ConfigError, match=r"source\.maximum_bytes_billed: Input should be a valid integer"):
        parse_settings({"source": {"schema": "prod_api", "events": ["api_call"], "maximum_bytes_billed": None},
                        "destinations": {"kable": {}}}, "usage_billing.yaml")
