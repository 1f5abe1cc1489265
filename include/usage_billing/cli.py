"""Command line for the ledger: what was rejected and why; its tables' revision.

    python -m usage_billing.cli rejected --destination orb [--reason-contains TEXT] [--limit 50]
    python -m usage_billing.cli summary
    python -m usage_billing.cli ledger-upgrade [--check]

The ledger database comes from ``--ledger-url`` or ``$USAGE_BILLING_LEDGER_URL`` (a SQLAlchemy
URL such as ``postgresql+psycopg2://user@host/db`` or ``sqlite:///.demo/warehouse.db``); the schema
from the configuration file. To re-send rejected events after fixing the mapping or the data,
trigger the destination's replay DAG, ``segment_to_<destination>_replay_rejected`` (README, "Rejected events").
"""

from __future__ import annotations

import argparse
import os
import sys

from usage_billing.destinations import DESTINATIONS
from usage_billing.ledger import Ledger, migrate
from usage_billing.settings import load_settings
from usage_billing.sources.postgres import create_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usage_billing.cli", description=__doc__.splitlines()[0])
    parser.add_argument("--ledger-url", default=os.environ.get("USAGE_BILLING_LEDGER_URL"))
    commands = parser.add_subparsers(dest="command", required=True)
    rejected = commands.add_parser("rejected", help="list rejected events, grouped by reason")
    rejected.add_argument("--destination", required=True, choices=list(DESTINATIONS))
    rejected.add_argument("--reason-contains")
    rejected.add_argument("--limit", type=int, default=50, help="events to list (0: only the reasons)")
    commands.add_parser("summary", help="events per destination and status")
    upgrade = commands.add_parser("ledger-upgrade", help="bring the ledger's tables to the newest revision "
                                                         "(every task also does this when it starts)")
    upgrade.add_argument("--check", action="store_true", help="only print the revision; exit 1 if behind")
    args = parser.parse_args(argv)
    if not args.ledger_url:
        parser.error("give --ledger-url or set $USAGE_BILLING_LEDGER_URL")

    settings = load_settings()
    engine = create_engine(args.ledger_url, [settings.ledger.schema_])
    ledger = Ledger(engine, settings.ledger.schema_)
    try:
        if args.command == "ledger-upgrade":
            return _upgrade(ledger, check=args.check)
        if args.command == "summary":
            for destination, statuses in sorted(ledger.counts().items()):
                print(f"{destination:<8} " + "  ".join(f"{s} {n}" for s, n in sorted(statuses.items())))
            return 0
        print(f"rejected {args.destination} events by reason:")
        for reason, count in ledger.rejected_reasons(args.destination, limit=100):
            if not args.reason_contains or args.reason_contains in reason:
                print(f"  {count:>8} x {reason}")
        if args.limit:
            rows = ledger.rejected(args.destination, args.reason_contains, args.limit)
            print(f"\nfirst {len(rows)} events (key, table, event time, attempts, reason):")
            for row in rows:
                print(f"  {row['idempotency_key']}  {row['event_table']}  {row['event_timestamp']}  "
                      f"x{row['attempts']}  {row['reason']}")
        return 0
    finally:
        engine.dispose()


def _upgrade(ledger: Ledger, check: bool) -> int:
    before = ledger.current_revision()
    newer = " (newer than this code: nothing to do)" if migrate.is_newer(before) else ""
    print(f"ledger {ledger.schema}: revision {before or '(none)'}, newest {migrate.head()}{newer}")
    behind = before != migrate.head() and not newer
    if check:
        return 1 if behind else 0
    ledger.create()
    if behind:
        print(f"ledger {ledger.schema}: upgraded to {ledger.current_revision()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
