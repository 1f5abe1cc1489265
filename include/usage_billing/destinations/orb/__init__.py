"""Orb: usage events through ``POST /v1/ingest``, late events through Orb backfills."""

from __future__ import annotations

from usage_billing.destinations.kind import Capabilities, Destination, DestinationKind
from usage_billing.destinations.orb.mapping import FUTURE_TOLERANCE, map_events, required_columns
from usage_billing.destinations.orb.settings import OrbSettings
from usage_billing.sources.layout import column_for, property_column

__all__ = ["KIND", "OrbSettings", "destination", "map_events", "required_columns"]

CAPABILITIES = Capabilities(backfills=True, read_api=True, customer_lookup=True)


def destination(config: OrbSettings) -> Destination:
    """Orb bound to one configuration."""
    fields = (("external_customer_id_field", config.external_customer_id_field,
               column_for(config.external_customer_id_field), True),
              *(("properties_mapping", s, property_column(s), False) for s in config.properties_mapping))
    return Destination(
        name=KIND.name, settings=config,
        map_events=lambda frame, now: map_events(frame, config, now),
        required_columns=lambda columns: required_columns(config, columns),
        mapped_fields=fields,
        describe=lambda payload: (payload["external_customer_id"], payload["event_name"]),
        capabilities=CAPABILITIES,
        key_column=column_for(config.idempotency_key_field),
        # The margin covers the time between mapping an event and Orb receiving it (retries).
        grace=config.grace_period - config.grace_margin,
        future_limit=FUTURE_TOLERANCE,
        unknown_customers=config.unknown_customers)


KIND = DestinationKind(name="orb", settings_model=OrbSettings, build=destination,
                       hook="billing_airflow.hooks.orb.OrbHook", capabilities=CAPABILITIES)
