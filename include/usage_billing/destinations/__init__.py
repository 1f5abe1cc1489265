"""Destinations: each is a pure mapping module plus these few facts the delivery core needs.

Adding a destination means a new mapping module here, a hook in ``plugins/``, and an entry in
:func:`get_destination`; the extraction, ledger, batching, retries and logging are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd

from usage_billing.destinations import kable, orb
from usage_billing.destinations.base import Mapped, Rejection
from usage_billing.settings import KableSettings, OrbSettings, Settings
from usage_billing.warehouse import column_for, property_column

__all__ = ["NAMES", "Destination", "Mapped", "Rejection", "get_destination"]

NAMES = ("orb", "kable")


@dataclass(frozen=True)
class Destination:
    """One destination as the delivery core sees it."""

    name: str
    settings: OrbSettings | KableSettings
    map_events: Callable[[pd.DataFrame, datetime], Mapped]
    required_columns: Callable[[list[str]], list[str]]
    mapped_fields: tuple[tuple[str, str, str], ...]
    # The warehouse column holding the idempotency key (what the ledger is keyed on).
    key_column: str = "id"
    # Events older than this go through an Orb backfill (None: the destination has no grace period).
    grace: timedelta | None = None
    # Events older than this are counted and warned about (Kable may have invoiced their period).
    old_event_warning: timedelta | None = None

    def backfill_cutoff(self, now: datetime) -> datetime | None:
        """Events with a timestamp before this go through a backfill; None: never."""
        return None if self.grace is None else now - self.grace

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def missing_fields(self, columns: list[str]) -> list[str]:
        """Settings whose column is absent from a table (normal for sparse properties; logged)."""
        return [f"{setting} {field!r} (column {column})" for setting, field, column in self.mapped_fields
                if column not in columns]


def get_destination(name: str, settings: Settings) -> Destination:
    """The destination ``name`` configured in ``settings``."""
    config = settings.destination(name)
    if name == "orb":
        assert isinstance(config, OrbSettings)
        fields = (("external_customer_id_field", config.external_customer_id_field,
                   column_for(config.external_customer_id_field)),
                  *(("properties_mapping", s, property_column(s)) for s in config.properties_mapping))
        return Destination(
            name=name, settings=config,
            map_events=lambda frame, now: orb.map_events(frame, config, now),
            required_columns=lambda columns: orb.required_columns(config, columns),
            mapped_fields=tuple(fields),
            key_column=column_for(config.idempotency_key_field),
            # The margin covers the time between mapping an event and Orb receiving it (retries).
            grace=config.grace_period - config.grace_margin)
    if name == "kable":
        assert isinstance(config, KableSettings)
        fields = (("client_id_field", config.client_id_field, column_for(config.client_id_field)),
                  *(("properties_mappings", s, property_column(s)) for s in config.properties_mappings))
        return Destination(
            name=name, settings=config,
            map_events=lambda frame, now: kable.map_events(frame, config, now),
            required_columns=lambda columns: kable.required_columns(config, columns),
            mapped_fields=tuple(fields),
            old_event_warning=config.late_event_warning)
    raise ValueError(f"unknown destination {name!r}; known: {', '.join(NAMES)}")
