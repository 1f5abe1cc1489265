"""Orb: usage events through ``POST /v1/ingest``, late events through Orb backfills.

The mapping (``mapping.py``, pandas) is named here by dotted path and imported when a task binds it.
"""

from __future__ import annotations

from usage_billing.destinations.kind import Capabilities, DestinationKind
from usage_billing.destinations.orb.settings import OrbSettings

__all__ = ["KIND", "OrbSettings"]

KIND = DestinationKind(name="orb", settings_model=OrbSettings,
                       build="usage_billing.destinations.orb.mapping.destination",
                       hook="billing_airflow.hooks.orb.OrbHook",
                       capabilities=Capabilities(backfills=True, read_api=True, customer_lookup=True))
