"""A delivery run in its own process, so a test can SIGKILL it mid-delivery.

Usage: python -m tests.integration.deliver_child '<json arguments>'
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    from billing_airflow.operators.deliver import hook_class
    from usage_billing.delivery import DeliveryJob, deliver_window
    from usage_billing.destinations import get_destination
    from usage_billing.ledger import Ledger, RunRef
    from usage_billing.settings import parse_settings
    from usage_billing.sources import Partition, Window
    from usage_billing.sources.postgres import SqlSource, create_engine

    settings = parse_settings(args["config"])
    destination = get_destination(args["destination"], settings)
    engine = create_engine(args["database_url"])
    ledger = Ledger(engine, settings.ledger.schema_)
    window = Window.from_dict(args["window"])
    with hook_class(destination.name)(destination.settings.conn_id, destination.settings) as hook:
        job = DeliveryJob(destination=destination, sender=hook, source=SqlSource(engine, settings.source.schema_),
                          ledger=ledger, run=RunRef("test_dag", args["run_id"]), loaded_at_column="received_at",
                          chunk_size=100, concurrency=2)
        for table in settings.source.events:
            deliver_window(job, Partition(table), window)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
