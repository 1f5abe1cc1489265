"""A delivery run in its own process, so a test can SIGKILL it mid-delivery.

Usage: python -m tests.integration.deliver_child '<json arguments>'

With ``"warehouse": true`` the source and the ledger are opened from the configuration's connections
the way a deliver task opens them (``open_warehouse``: the source's kind by the type of
``source.conn_id`` — Snowflake, BigQuery, Redshift —, the ledger on the postgres ``ledger.conn_id``);
otherwise the source and the ledger share the PostgreSQL at ``database_url``.
"""

from __future__ import annotations

import contextlib
import json
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    from billing_airflow.operators.deliver import hook_class, open_warehouse
    from usage_billing.delivery import DeliveryJob, deliver_window
    from usage_billing.destinations import get_destination
    from usage_billing.ledger import Ledger, RunRef
    from usage_billing.settings import parse_settings
    from usage_billing.sources import Partition, Window
    from usage_billing.sources.postgres import create_engine
    from usage_billing.sources.postgres.source import SqlSource

    settings = parse_settings(args["config"])
    destination = get_destination(args["destination"], settings)
    window = Window.from_dict(args["window"])
    with contextlib.ExitStack() as stack:
        if args.get("warehouse"):
            source, ledger = stack.enter_context(open_warehouse(settings))
        else:
            engine = create_engine(args["database_url"])
            stack.callback(engine.dispose)
            source, ledger = SqlSource(engine, settings.source.schema_), Ledger(engine, settings.ledger.schema_)
        hook = stack.enter_context(hook_class(destination.name)(destination.settings.conn_id, destination.settings))
        job = DeliveryJob(destination=destination, sender=hook, source=source, ledger=ledger,
                          run=RunRef("test_dag", args["run_id"]), loaded_at_column=settings.source.loaded_at_column,
                          chunk_size=100, concurrency=2)
        for table in settings.source.events:
            deliver_window(job, Partition(table), window)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
