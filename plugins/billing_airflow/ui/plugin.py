"""Registers the Billing view with Airflow 3: a FastAPI app mounted on the api-server, and a menu entry.

The app (``/billing/``) is behind Airflow's own authentication: a FastAPI plugin endpoint is open to
anyone unless it says otherwise, so every route depends on ``requires_access_dag("GET")``, which
reads the UI's session cookie (or an API token) and asks the auth manager whether the user may read
DAGs. The menu entry (``external_views``, destination ``nav``) shows the page inside the UI, at
``/plugin/billing``.

The ledger is read on the ledger's connection (``ledger.conn_id`` in the configuration), resolved by
the api-server's secrets backends (environment variables, then the metadata database).
"""

from __future__ import annotations

from typing import ClassVar

import sqlalchemy as sa
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

URL_PREFIX = "/billing"


def ledger_url(conn_id: str) -> sa.URL:
    """The ledger's database, from its Airflow connection (PostgreSQL, or SQLite with the file in ``host``)."""
    from airflow.models.connection import Connection

    conn = Connection.get_connection_from_secrets(conn_id)
    conn_type = (conn.conn_type or "").lower()
    if conn_type in ("postgres", "postgresql"):
        return sa.URL.create("postgresql+psycopg2", username=conn.login or None, password=conn.password or None,
                             host=conn.host or None, port=conn.port or None, database=conn.schema or None)
    if conn_type == "sqlite":
        return sa.URL.create("sqlite", database=conn.host or conn.schema)
    raise ValueError(f"connection {conn_id!r}: conn_type {conn.conn_type!r} is not supported for the ledger")


def billing_page(customer: str | None = None) -> str:
    """The page, read from the ledger on a connection of its own (closed again: the api-server is long-lived)."""
    from billing_airflow.ui.billing_view import render, summarize
    from usage_billing.ledger import Ledger
    from usage_billing.settings import load_settings
    from usage_billing.sources.postgres import create_engine

    settings = load_settings()
    engine = create_engine(ledger_url(settings.ledger.conn_id), [settings.ledger.schema_])
    try:
        return render(summarize(Ledger(engine, settings.ledger.schema_), customer=customer))
    finally:
        engine.dispose()


app = FastAPI(title="usage_billing: Billing view", dependencies=[Depends(requires_access_dag("GET"))])


@app.get("/", response_class=HTMLResponse)
def billing(customer: str | None = None) -> str:
    """The Billing view (HTML); ``?customer=<id>`` shows only that customer in the per-customer table."""
    return billing_page((customer or "").strip() or None)


class BillingViewPlugin(AirflowPlugin):
    name = "usage_billing_view"
    fastapi_apps: ClassVar[list] = [{"app": app, "url_prefix": URL_PREFIX, "name": "Billing view"}]
    external_views: ClassVar[list] = [{"name": "Billing", "href": f"{URL_PREFIX}/", "destination": "nav",
                                       "url_route": "billing", "category": "Browse"}]
