"""Alembic environment for the ledger, run programmatically by ``usage_billing.ledger.migrate``.

There is no alembic.ini: the caller passes the open connection and the ledger schema in
``config.attributes``, so the migrations run inside the caller's transaction (and its DDL lock).
The version table lives in the ledger schema, beside the tables it versions: two ledgers in one
database (and Airflow's own ``alembic_version``) never see each other's revision.
"""

from __future__ import annotations

from alembic import context

config = context.config
if context.is_offline_mode():
    raise RuntimeError("the ledger migrations run online only: use `python -m usage_billing.cli ledger-upgrade`")

connection = config.attributes["connection"]
context.configure(
    connection=connection,
    version_table_schema=config.attributes["schema"],
    # SQLite alters a table by copying it; batch mode does that where ALTER cannot.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
