"""Snowflake: Segment's track tables read through the Airflow Snowflake provider's connection and hook.

The connection (conn_type ``snowflake``) carries the account, user and key pair or password, the
warehouse, role and the database Segment loads (``extra.database``); ``source.schema`` names the
Segment source's schema. The ledger stays in PostgreSQL: Snowflake enforces no keys on standard tables
and has no advisory locks, so the core filters each chunk against the ledger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usage_billing.sources.base import SourceKind

if TYPE_CHECKING:
    from usage_billing.settings import Settings, SourceSettings
    from usage_billing.sources.snowflake.reader import SnowflakeSource

__all__ = ["KIND", "open_snowflake_source"]


def open_snowflake_source(settings: SourceSettings | Settings) -> SnowflakeSource:
    """The source of ``settings.conn_id``, connected by the provider's hook (its auth options apply)."""
    # The whole configuration (the core after its refactor) or its source: section (before it).
    settings = getattr(settings, "source", settings)
    # Imported here: the registry is read when DAGs are parsed, and the provider and pyarrow are heavy.
    from airflow.providers.snowflake.hooks.snowflake import SnowflakeHook

    from usage_billing.sources.snowflake.reader import SnowflakeSource

    # The session runs in UTC, so window bounds and TIMESTAMP_LTZ values mean UTC (Snowflake's documented
    # session parameter, merged with any the connection sets).
    extra = SnowflakeHook.get_connection(settings.conn_id).extra_dejson
    session = {**(extra.get("session_parameters") or {}), "TIMEZONE": "UTC"}
    connection = SnowflakeHook(snowflake_conn_id=settings.conn_id, session_parameters=session).get_conn()
    return SnowflakeSource(connection, settings.schema_, KIND)


KIND = SourceKind(name="snowflake", conn_types=("snowflake",), open=open_snowflake_source,
                  ledger_join=False, hosts_ledger=False,
                  description="Snowflake: QUALIFY-deduplicated window, Arrow result batches, ledger in PostgreSQL")
