"""Kable: usage events through ``POST /api/v1/events/create``; no backfills, no read API."""

from __future__ import annotations

from usage_billing.destinations.kable.mapping import data_keys, map_events, required_columns
from usage_billing.destinations.kable.settings import KableSettings
from usage_billing.destinations.kind import Destination, DestinationKind
from usage_billing.sources.layout import column_for, property_column

__all__ = ["KIND", "KableSettings", "data_keys", "destination", "map_events", "required_columns"]


def destination(config: KableSettings) -> Destination:
    """Kable bound to one configuration."""
    fields = (("client_id_field", config.client_id_field, column_for(config.client_id_field), True),
              *(("properties_mappings", s, property_column(s), False) for s in config.properties_mappings))
    name_key = config.event_name_key
    return Destination(
        name=KIND.name, settings=config,
        map_events=lambda frame, now: map_events(frame, config, now),
        required_columns=lambda columns: required_columns(config, columns),
        mapped_fields=fields,
        describe=lambda payload: (payload["clientId"], payload["data"].get(name_key) if name_key else None),
        old_event_warning=config.late_event_warning,
        future_limit=config.future_event_limit)


KIND = DestinationKind(name="kable", settings_model=KableSettings, build=destination,
                       hook="billing_airflow.hooks.kable.KableHook")
