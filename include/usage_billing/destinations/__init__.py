"""The destinations this pipeline delivers to: one line per destination.

A destination is a package beside ``orb/`` and ``kable/``: its settings model (``settings.py``),
its pure mapping (``mapping.py``, with the function binding it to a configuration), and a ``KIND``
naming that function and its Airflow hook by dotted path, and declaring its capabilities. The
extraction, ledger, batching, retries and logging are shared. Adding one: the package, its hook in
``plugins/billing_airflow/hooks/``, and one line in :data:`DESTINATIONS`.

Importing the registry imports the settings models only: the settings are loaded whenever Airflow
parses a DAG file, and the mappings (pandas) are imported by :func:`get_destination`, in a task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usage_billing.destinations import kable, orb
from usage_billing.destinations.kind import Capabilities, Destination, DestinationKind

if TYPE_CHECKING:
    from usage_billing.settings import Settings

__all__ = ["DESTINATIONS", "Capabilities", "Destination", "DestinationKind", "get_destination"]

DESTINATIONS: dict[str, DestinationKind] = {
    "orb": orb.KIND,
    "kable": kable.KIND,
}


def get_destination(name: str, settings: Settings) -> Destination:
    """The destination ``name`` configured in ``settings``."""
    if name not in DESTINATIONS:
        raise ValueError(f"unknown destination {name!r}; known: {', '.join(DESTINATIONS)}")
    return DESTINATIONS[name].bind(settings.destination(name))
