"""The warehouses this pipeline reads: one line per kind.

A kind is a package under ``usage_billing.sources`` exposing ``KIND`` (a :class:`SourceKind`: the
Airflow connection types it serves, how to open it, whether the ledger filter can run inside its
queries). The Airflow connection named by ``source.conn_id`` picks the kind by its type. Adding a
warehouse: a package beside ``postgres/`` and one line in :data:`SOURCES`.
"""

from __future__ import annotations

from usage_billing.sources import bigquery, postgres, redshift, snowflake
from usage_billing.sources.base import QueryCost, ReadRequest, Source, SourceKind
from usage_billing.sources.layout import Partition, Window

__all__ = ["SOURCES", "Partition", "QueryCost", "ReadRequest", "Source", "SourceKind", "Window", "kind_for"]

SOURCES: dict[str, SourceKind] = {
    "postgres": postgres.KIND,
    "snowflake": snowflake.KIND,
    "bigquery": bigquery.KIND,
    "redshift": redshift.KIND,
}


def kind_for(conn_type: str) -> SourceKind:
    """The source kind serving an Airflow connection type."""
    for kind in SOURCES.values():
        if conn_type.lower() in kind.conn_types:
            return kind
    served = sorted(t for kind in SOURCES.values() for t in kind.conn_types)
    raise ValueError(f"source.conn_id: connection type {conn_type!r} is not a warehouse this project reads "
                     f"(known connection types: {', '.join(served)})")
