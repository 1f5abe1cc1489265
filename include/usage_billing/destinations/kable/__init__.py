"""Kable: usage events through ``POST /api/v1/events/create``; no backfills, no read API.

The mapping (``mapping.py``, pandas) is named here by dotted path and imported when a task binds it.
"""

from __future__ import annotations

from usage_billing.destinations.kable.settings import KableSettings
from usage_billing.destinations.kind import DestinationKind

__all__ = ["KIND", "KableSettings"]

KIND = DestinationKind(name="kable", settings_model=KableSettings,
                       build="usage_billing.destinations.kable.mapping.destination",
                       hook="billing_airflow.hooks.kable.KableHook")
