"""Segment's track tables in PostgreSQL (or SQLite, for the embedded demo), read with SQLAlchemy.

Segment's PostgreSQL layout: one schema per Segment source, one table per event, lower-case
snake_case columns, ``timestamp with time zone`` timestamps, ``received_at`` / ``uuid_ts`` saying
when a row arrived (see the README's warehouse table). When the ledger lives in the same database
(the default), the "already delivered" filter is a ``NOT EXISTS`` inside the extraction query, so
delivered rows never leave the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usage_billing.sources.base import SourceKind
from usage_billing.sources.postgres.connection import create_engine, sqlalchemy_url

if TYPE_CHECKING:
    from usage_billing.settings import Settings
    from usage_billing.sources.postgres.source import SqlSource

__all__ = ["KIND", "create_engine", "open_sql_source", "sqlalchemy_url"]


def open_sql_source(settings: Settings) -> SqlSource:
    """The source of ``source.conn_id`` (a postgres or sqlite connection). SQLite has no schemas:
    the ledger's schema is attached too, in case the ledger shares this database."""
    # Imported here: the registry is read when DAGs are parsed, and the reader needs pandas.
    from usage_billing.sources.postgres.source import SqlSource

    source = settings.source
    schemas = [source.schema_, settings.ledger.schema_]
    return SqlSource(create_engine(sqlalchemy_url(source.conn_id), schemas), source.schema_)


KIND = SourceKind(name="postgres", conn_types=("postgres", "postgresql", "sqlite"), open=open_sql_source,
                  ledger_join=True, hosts_ledger=True,
                  description="PostgreSQL (SQLite for the embedded demo): COPY into pandas, ledger filter in-database")
