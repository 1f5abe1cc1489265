"""A destination as the delivery core sees it, and as the registry lists it.

:class:`DestinationKind` is what a destination package declares once (its settings model, how to
build it from those settings, its Airflow hook, its capabilities); :class:`Destination` is one
configured destination: the pure mapping bound to its settings, and the facts the core needs.
Capabilities are declared here, never guessed from the hook's methods or the destination's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from usage_billing.settings_base import DeliverySettings

if TYPE_CHECKING:
    import pandas as pd

    from usage_billing.destinations.base import Mapped


@dataclass(frozen=True)
class Capabilities:
    """What a destination's API offers beyond ingesting events."""

    # Orb-style backfills: late events past a grace period, and replace mode (re-billing a period).
    backfills: bool = False
    # An API to read back what the destination holds (event counts, search by key).
    read_api: bool = False
    # An API saying whether a billing customer exists (events of unknown ones bill nothing).
    customer_lookup: bool = False


@dataclass(frozen=True)
class DestinationKind:
    """One registry line's worth: everything the project knows about a destination type."""

    name: str
    settings_model: type[DeliverySettings]
    # The function binding the pure mapping to one configuration (dotted path: the mapping imports
    # pandas, and the settings, which the DAG processor loads for every parse, only need the model).
    build: str
    # The Airflow hook class (dotted path: the core does not import Airflow).
    hook: str
    capabilities: Capabilities = Capabilities()

    def bind(self, config: DeliverySettings) -> Destination:
        """The destination bound to ``config``; imports its mapping now."""
        module, _, name = self.build.rpartition(".")
        return getattr(importlib.import_module(module), name)(config)


@dataclass(frozen=True)
class Destination:
    """One configured destination: mapping, ledger facts and capabilities."""

    name: str
    settings: DeliverySettings
    map_events: Callable[[pd.DataFrame, datetime], Mapped]
    required_columns: Callable[[list[str]], list[str]]
    # (setting, Segment field, warehouse column, required) of every configured field, named in errors.
    # A required field (the customer) missing from a table rejects its every row; a property may be
    # absent from the tables of other event types (Segment adds a column when a value first arrives).
    mapped_fields: tuple[tuple[str, str, str, bool], ...]
    # The billing customer and event name of a payload, recorded in the ledger for the billing view.
    describe: Callable[[dict], tuple[str | None, str | None]]
    capabilities: Capabilities = Capabilities()
    # The warehouse column holding the idempotency key (what the ledger is keyed on).
    key_column: str = "id"
    # Events older than this go through a backfill (None: the destination has no grace period).
    grace: timedelta | None = None
    # Events older than this are counted and warned about (the period may already be invoiced).
    old_event_warning: timedelta | None = None
    # Events stamped further ahead than this are held until due (None: the destination takes any).
    future_limit: timedelta | None = None
    # With customer_lookup: "send" events of customers the destination does not know (with a
    # warning), or "hold" them until the customer exists.
    unknown_customers: str = "send"

    def backfill_cutoff(self, now: datetime) -> datetime | None:
        """Events with a timestamp before this go through a backfill; None: never."""
        if self.grace is None or not self.capabilities.backfills:
            return None
        return now - self.grace

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def missing_fields(self, columns: list[str], required: bool) -> list[str]:
        """Configured fields (required ones, or properties) whose column is absent from ``columns``."""
        return [f"{setting} {field!r} (column {column})" for setting, field, column, needed in self.mapped_fields
                if needed == required and column not in columns]
