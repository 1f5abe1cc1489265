"""The Billing view's FastAPI app: the customer filter reaches the page (auth is Airflow's, tested in the browser)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def client(monkeypatch):
    from billing_airflow.ui import plugin

    asked: list = []
    monkeypatch.setattr(plugin, "billing_page", lambda customer=None: asked.append(customer) or "<p>page</p>")
    [auth] = plugin.app.router.dependencies
    plugin.app.dependency_overrides[auth.dependency] = lambda: None
    try:
        yield TestClient(plugin.app), asked
    finally:
        plugin.app.dependency_overrides.clear()


@pytest.mark.parametrize(("query", "customer"), [
    ("", None), ("?customer=acme", "acme"), ("?customer=+acme+", "acme"), ("?customer=", None),
    ("?customer=%3Cscript%3E", "<script>"),
], ids=["none", "one", "trimmed", "empty", "as-typed"])
def test_the_customer_query_parameter_filters_the_page(client, query, customer):
    http, asked = client
    response = http.get(f"/{query}")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert asked == [customer]
