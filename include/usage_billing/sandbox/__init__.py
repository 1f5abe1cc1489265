"""Local sandbox servers imitating Orb's and Kable's event-ingestion APIs.

Both run a real HTTP server on 127.0.0.1 (port 0 picks a free port), record what they accept,
and can be told to misbehave (:class:`Fault`) so retry, timeout and idempotency handling can be
tested over real loopback HTTP::

    from usage_billing.sandbox import Fault, OrbSandbox

    with OrbSandbox(api_key="orb-test-key") as orb:
        orb.inject(Fault.LOST_RESPONSE)      # accept the next batch, then reset the connection
        ...                                  # point the client at orb.url
        assert orb.accepted_keys() == expected

``python -m usage_billing.sandbox`` runs both as a separate process (see ``__main__``).
"""

from __future__ import annotations

from usage_billing.sandbox.kable import KableSandbox
from usage_billing.sandbox.orb import OrbSandbox
from usage_billing.sandbox.server import Fault, RequestRecord, SandboxServer, ServerOptions

__all__ = ["Fault", "KableSandbox", "OrbSandbox", "RequestRecord", "SandboxServer", "ServerOptions"]
