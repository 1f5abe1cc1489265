"""Redshift: Segment's track tables over the PostgreSQL wire protocol (psycopg2), from a ``redshift``
connection.

The connection is the Amazon provider's ``redshift`` type, read with its fields: ``host`` (the
cluster or workgroup endpoint), ``port`` (5439), ``schema`` (the database), ``login``, ``password``, and
``extra.sslmode`` (default ``require``). The provider itself is not required: its hook drives
``redshift_connector``, which has no server-side cursor (a result is read whole into client memory)
and which was measured unable to reach PostgreSQL, so no test could exercise it here; psycopg2 is
already in the lock. IAM authentication (``extra.iam``) needs the provider's token exchange and is not
supported by this source; use a database user.

The ledger stays in PostgreSQL: Redshift enforces no keys and has no advisory locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usage_billing.sources.base import SourceKind

if TYPE_CHECKING:
    from usage_billing.settings import Settings, SourceSettings
    from usage_billing.sources.redshift.reader import RedshiftSource

__all__ = ["KIND", "open_redshift_source"]


def open_redshift_source(settings: SourceSettings | Settings) -> RedshiftSource:
    """The source of ``settings.conn_id`` (a redshift connection)."""
    # The whole configuration (the core after its refactor) or its source: section (before it).
    settings = getattr(settings, "source", settings)
    import psycopg2
    from airflow.sdk import BaseHook

    from usage_billing.sources.redshift.reader import RedshiftSource

    conn = BaseHook.get_connection(settings.conn_id)
    extra = conn.extra_dejson
    if str(extra.get("iam", "")).lower() in ("true", "1"):
        raise ValueError(f"connection {settings.conn_id!r}: IAM authentication is not supported by the Redshift "
                         f"source; give the connection a database user and password")
    connection = psycopg2.connect(host=conn.host, port=conn.port or 5439, dbname=conn.schema or "dev",
                                  user=conn.login, password=conn.password or None,
                                  sslmode=extra.get("sslmode", "require"), connect_timeout=30)
    return RedshiftSource(connection, settings.schema_, KIND)


KIND = SourceKind(name="redshift", conn_types=("redshift",), open=open_redshift_source,
                  ledger_join=False, hosts_ledger=False,
                  description="Redshift: deduplicated window through a server-side cursor, ledger in PostgreSQL")
