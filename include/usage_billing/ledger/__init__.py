"""The ledger: what was delivered to each destination and what was rejected, in SQL.

``store`` holds the protocol (check -> send -> mark) and the reports; ``tables`` the tables as the
newest migration leaves them; ``migrate`` and ``migrations/`` version them with Alembic.
"""

from __future__ import annotations

from usage_billing.ledger.store import MAX_REASON, EventRefs, Ledger, Route, RunRef, generic_reason
from usage_billing.ledger.tables import DELIVERED, HELD, LOST, QUEUED, REJECTED, RetryRejected

__all__ = [
           "DELIVERED",
           "HELD",
           "LOST",
           "MAX_REASON",
           "QUEUED",
           "REJECTED",
           "EventRefs",
           "Ledger",
           "RetryRejected",
           "Route",
           "RunRef",
           "generic_reason",
]
