"""A delivery run in its own process, so a test can SIGKILL it mid-delivery.

Usage: python -m tests.integration.deliver_child '<json arguments>'
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    from billing_airflow.operators.deliver import HOOKS
    from usage_billing.delivery import deliver_partition
    from usage_billing.destinations import get_destination
    from usage_billing.ledger import Ledger, RunRef
    from usage_billing.settings import parse_settings
    from usage_billing.warehouse import Partition, Window, create_engine

    settings = parse_settings(args["config"])
    destination = get_destination(args["destination"], settings)
    engine = create_engine(args["database_url"])
    ledger = Ledger(engine, settings.ledger.schema_)
    window = Window.from_dict(args["window"])
    with HOOKS[destination.name](destination.settings.conn_id, destination.settings) as hook:
        for table in settings.source.events:
            deliver_partition(engine=engine, schema=settings.source.schema_, partition=Partition(table),
                              window=window, loaded_at_column="received_at", chunk_size=100,
                              destination=destination, sender=hook, ledger=ledger,
                              run=RunRef("test_dag", args["run_id"]), concurrency=2)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
