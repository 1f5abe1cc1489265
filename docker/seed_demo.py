"""One-shot ``demo-seed`` service of ``docker compose --profile demo up``.

1. Loads realistic Segment sample data (``usage_billing.sample_data``) into the demo warehouse, the
   PostgreSQL that the ``segment_warehouse`` connection (``AIRFLOW_CONN_SEGMENT_WAREHOUSE``) names,
   in the schema of ``source.schema`` in ``$USAGE_BILLING_CONFIG``. The data covers the last
   ``--hours`` hours plus six earlier hours (so the lookback and late loads have something to find).
   A warehouse that already holds sample rows is left alone: restarting the stack does not reseed.
2. With ``--start-dags``, once the dag-processor has parsed the DAGs: creates one backfill per DAG
   over the seeded hours (``--max-active-runs 1``) and unpauses ``segment_to_orb`` and
   ``segment_to_kable``, so the demo delivers to the sandboxes with nobody clicking anything.

Runs inside the project's Airflow image (``python /opt/airflow/docker/seed_demo.py``), with
``include/`` and ``plugins/`` on ``PYTHONPATH``. Exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

DAG_IDS = ("segment_to_orb", "segment_to_kable")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="seed_demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=6, help="hours of data to backfill (6 more are seeded before)")
    parser.add_argument("--events-per-hour", type=int, default=300, help="events per hour and event type")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--conn-id", default="segment_warehouse", help="Airflow connection of the warehouse")
    parser.add_argument("--start-dags", action="store_true", help="backfill the seeded hours and unpause the DAGs")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the DAGs to be parsed")
    return parser.parse_args(argv)


def _already_seeded(engine, schema: str, tables: list[str]) -> bool:
    import sqlalchemy as sa

    inspector = sa.inspect(engine)
    preparer = engine.dialect.identifier_preparer
    for table in tables:
        if not inspector.has_table(table, schema=schema):
            continue
        with engine.connect() as conn:
            name = f"{preparer.quote_schema(schema)}.{preparer.quote(table)}"
            if conn.execute(sa.text(f"SELECT 1 FROM {name} LIMIT 1")).first() is not None:
                return True
    return False


def seed(args: argparse.Namespace, now: datetime) -> tuple[datetime, datetime] | None:
    """Load the sample rows; return the backfill range, or None when the warehouse was seeded before."""
    from billing_airflow.operators.deliver import sqlalchemy_url
    from usage_billing import sample_data
    from usage_billing.settings import load_settings
    from usage_billing.sources.postgres import create_engine

    settings = load_settings()
    schema = settings.source.schema_
    engine = create_engine(sqlalchemy_url(args.conn_id), [schema, settings.ledger.schema_])
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    first_hour = last_hour - timedelta(hours=args.hours)
    try:
        if _already_seeded(engine, schema, list(settings.source.events)):
            print(f"demo-seed: {schema} already holds sample data; not reseeding", flush=True)
            return None
        sample = sample_data.Sample(start=first_hour - timedelta(hours=6), hours=args.hours + 6,
                                    events_per_hour=args.events_per_hour, seed=args.seed, now=now)
        stats = sample_data.generate(engine, schema, sample)
    finally:
        engine.dispose()
    print(f"demo-seed: loaded {stats.rows} Segment rows into {schema} ({stats.duplicates} duplicates, "
          f"{stats.anonymous} anonymous, {stats.late} loaded late)", flush=True)
    # Logical dates of an interval timetable are the interval starts; both ends are inclusive.
    return first_hour, last_hour - timedelta(hours=1)


def _airflow(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    executable = shutil.which("airflow") or "airflow"
    # Fixed arguments, no shell.
    result = subprocess.run([executable, *args], capture_output=True, text=True, check=False)  # noqa: S603
    if check and result.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result


def start_dags(backfill: tuple[datetime, datetime] | None, wait: float) -> None:
    """Wait until the DAGs are serialized, backfill the seeded hours, then unpause the DAGs."""
    deadline = time.monotonic() + wait
    pending = list(DAG_IDS)
    while pending:
        pending = [dag_id for dag_id in pending if _airflow("dags", "details", dag_id, check=False).returncode != 0]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"DAGs {pending} were not parsed within {wait:.0f}s: check the dag-processor's log "
                               f"and `airflow dags list-import-errors`")
        if pending:
            time.sleep(10)
    for dag_id in DAG_IDS:
        if backfill is not None:
            start, end = (moment.strftime("%Y-%m-%dT%H:%M:%S") for moment in backfill)
            # Created while the DAG is still paused; the scheduler starts the runs once it is unpaused.
            _airflow("backfill", "create", "--dag-id", dag_id, "--from-date", start, "--to-date", end,
                     "--max-active-runs", "1")
            print(f"demo-seed: backfill of {dag_id} created for {start} .. {end} (UTC)", flush=True)
        _airflow("dags", "unpause", dag_id)
        print(f"demo-seed: {dag_id} unpaused", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        backfill = seed(args, datetime.now(UTC))
        if args.start_dags:
            start_dags(backfill, args.wait)
    except Exception as error:
        print(f"demo-seed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    print("demo-seed: done; the Orb and Kable sandboxes' /_sandbox/events show what was delivered", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
