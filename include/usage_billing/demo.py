"""``make run``: the whole product on embedded defaults, end to end, in one process.

1. creates (once) an embedded SQLite warehouse under ``.demo/`` with realistic Segment data for the
   last hours: several event types and customers, late-loaded and duplicate rows, anonymous events;
2. starts the local Orb and Kable sandboxes on loopback (their accepted events persist in ``.demo/``);
3. runs the real DAGs ``segment_to_orb`` and ``segment_to_kable`` hour by hour with ``dag.test()``,
   against Airflow connections pointing at the warehouse and the sandboxes;
4. prints what each destination received, from the sandboxes' own records and the ledger.

Run it again and it delivers nothing new: the ledger skips what was delivered. ``--fresh`` starts
over. ``--hours`` and ``--events-per-hour`` size the sample.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
API_KEYS = {"orb": "demo-orb-api-key", "kable_client": "kci_demo", "kable": "sk_test.demo"}


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=str(PROJECT / ".demo"), help="where the demo keeps its files")
    parser.add_argument("--hours", type=int, default=6, help="hourly runs to execute (and hours of sample data)")
    parser.add_argument("--events-per-hour", type=int, default=300)
    parser.add_argument("--fresh", action="store_true", help="delete the demo state and start over")
    parser.add_argument("--verbose", action="store_true", help="show Airflow's own task logs")
    return parser.parse_args(argv)


def _airflow_environment(state: Path, warehouse_db: Path, orb_url: str, kable_url: str) -> None:
    """Airflow reads its configuration at import: set everything before importing it."""
    home = state / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__API_AUTH__JWT_SECRET": "usage-billing-demo-" + "x" * 64,
        "AIRFLOW_CONN_SEGMENT_WAREHOUSE": json.dumps({"conn_type": "sqlite", "host": str(warehouse_db)}),
        "AIRFLOW_CONN_ORB_DEFAULT": json.dumps({"conn_type": "http", "host": orb_url, "password": API_KEYS["orb"]}),
        "AIRFLOW_CONN_KABLE_DEFAULT": json.dumps({"conn_type": "http", "host": kable_url,
                                                  "login": API_KEYS["kable_client"], "password": API_KEYS["kable"]}),
    })


def _summary_lines(title: str, events: list[dict], customer_key: str, name_of) -> list[str]:
    by_name = Counter(name_of(e) for e in events)
    by_customer = Counter(e.get(customer_key) for e in events)
    lines = [f"  {title}: {len(events)} events"]
    if not events:
        return lines
    lines += [f"      {count:>6}  {name}" for name, count in by_name.most_common()]
    top = ", ".join(f"{customer} {count}" for customer, count in by_customer.most_common(4))
    lines.append(f"      top customers: {top}")
    return lines


def _ledger_counts(warehouse_db: Path, settings) -> dict:
    from usage_billing.ledger import Ledger
    from usage_billing.sources.postgres import create_engine

    engine = create_engine(f"sqlite:///{warehouse_db}", [settings.source.schema_, settings.ledger.schema_])
    try:
        ledger = Ledger(engine, settings.ledger.schema_)
        ledger.create()
        return ledger.counts()
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    state = Path(args.state_dir).resolve()
    if args.fresh and state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")

    from usage_billing import sample_data
    from usage_billing.sandbox import KableSandbox, OrbSandbox
    from usage_billing.settings import load_settings
    from usage_billing.sources.postgres import create_engine

    settings = load_settings()
    warehouse_db = state / "warehouse.db"
    now = datetime.now(UTC)
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    first_hour = last_hour - timedelta(hours=args.hours)
    engine = create_engine(f"sqlite:///{warehouse_db}", [settings.source.schema_, settings.ledger.schema_])
    marker = state / "sample.json"
    if not marker.exists():
        stats = sample_data.generate(engine, settings.source.schema_, start=first_hour - timedelta(hours=6),
                                     hours=args.hours + 6, events_per_hour=args.events_per_hour, seed=7, now=now)
        marker.write_text(json.dumps({"created_at": now.isoformat(), "first_hour": first_hour.isoformat()}))
        print(f"warehouse: created {warehouse_db.name} with {stats.rows} Segment rows "
              f"({stats.duplicates} duplicates, {stats.anonymous} anonymous, {stats.late} loaded late) "
              f"in {settings.source.schema_}.{{{', '.join(stats.per_event)}}}")
    else:
        first_hour = datetime.fromisoformat(json.loads(marker.read_text())["first_hour"])
        print(f"warehouse: reusing {warehouse_db} (make run ARGS=--fresh starts over)")
    engine.dispose()

    with OrbSandbox(api_key=API_KEYS["orb"], state_file=state / "orb-accepted.jsonl") as orb, \
            KableSandbox(client_id=API_KEYS["kable_client"], api_key=API_KEYS["kable"],
                         state_file=state / "kable-accepted.jsonl") as kable:
        before = {"orb": len(orb.accepted()), "kable": len(kable.accepted())}
        _airflow_environment(state, warehouse_db, orb.url, kable.url)
        print(f"running segment_to_orb and segment_to_kable for {args.hours} hours "
              f"(Airflow task logs: {state / 'airflow-tasks.log'})", flush=True)
        sandboxes = {"orb": orb, "kable": kable}

        def progress(name: str) -> dict:
            counts = _ledger_counts(warehouse_db, settings).get(name, {})
            return {"accepted": len(sandboxes[name].accepted()), "rejected": counts.get("rejected", 0)}

        runs = _run_dags(first_hour, args.hours, args.verbose, state / "airflow-tasks.log", progress)
        new = {"orb": orb.accepted()[before["orb"]:], "kable": kable.accepted()[before["kable"]:]}
        totals = {"orb": len(orb.accepted()), "kable": len(kable.accepted())}

    from usage_billing.ledger import Ledger

    engine = create_engine(f"sqlite:///{warehouse_db}", [settings.source.schema_, settings.ledger.schema_])
    ledger = Ledger(engine, settings.ledger.schema_)
    counts = ledger.counts()
    print()
    print(f"Delivery report: {args.hours} hourly runs per DAG, windows {first_hour:%Y-%m-%d %H:00} .. "
          f"{first_hour + timedelta(hours=args.hours):%H:00} UTC, lookback {settings.source.lookback}")
    for name, failed in runs.items():
        print(f"  segment_to_{name}: {len(failed)} failed runs" + (f" ({', '.join(failed)})" if failed else ""))
    lines = _summary_lines("Orb sandbox received now", new["orb"], "external_customer_id",
                           lambda e: e.get("event_name"))
    lines += [f"      sandbox total {totals['orb']}; ledger {counts.get('orb', {})}"]
    lines += [f"      rejected: {count} x {reason}" for reason, count in ledger.rejected_reasons("orb", 4)]
    lines += _summary_lines("Kable sandbox received now", new["kable"], "clientId",
                            lambda e: (e.get("data") or {}).get("event", "(no event name)"))
    lines += [f"      sandbox total {totals['kable']}; ledger {counts.get('kable', {})}"]
    lines += [f"      rejected: {count} x {reason}" for reason, count in ledger.rejected_reasons("kable", 4)]
    print("\n".join(lines))
    engine.dispose()
    if not new["orb"] and not new["kable"]:
        print("Nothing new was delivered: every event in these windows is already in the ledger.")
    return 1 if any(runs.values()) else 0


def _run_dags(first_hour: datetime, hours: int, verbose: bool, log_path: Path,
              progress: Callable[[str], dict]) -> dict[str, list[str]]:
    """Run both DAGs hour by hour; Airflow's own output goes to ``log_path`` unless ``verbose``."""
    with _output_to(None if verbose else log_path) as say:
        from airflow.models.dagbag import DagBag
        from airflow.utils import db
        from airflow.utils.state import DagRunState

        db.resetdb()
        bag = DagBag(dag_folder=str(PROJECT / "dags"))
        if bag.import_errors:
            raise SystemExit(f"DAG import errors: {bag.import_errors}")
        failed: dict[str, list[str]] = {}
        for name in ("orb", "kable"):
            dag = bag.dags[f"segment_to_{name}"]
            failed[name] = []
            for hour in range(hours):
                # A manual run's data interval ends at its logical date.
                logical_date = first_hour + timedelta(hours=hour + 1)
                before = progress(name)
                run = dag.test(logical_date=logical_date)
                after = progress(name)
                if run.state != DagRunState.SUCCESS:
                    failed[name].append(f"{logical_date:%H:00}")
                say(f"  segment_to_{name:<5} [{run.data_interval_start:%Y-%m-%d %H:%M}, "
                    f"{run.data_interval_end:%H:%M}) {run.state}: "
                    + ", ".join(f"{after[k] - before[k]} {k}" for k in after))
    return failed


@contextlib.contextmanager
def _output_to(log_path: Path | None) -> Iterator[Callable[[str], None]]:
    """Send everything written to stdout/stderr (Airflow's task logs) to a file; yield a printer."""
    sys.stdout.flush()
    sys.stderr.flush()
    if log_path is None:
        yield lambda line: print(line, flush=True)
        return
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", encoding="utf-8") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield lambda line: print(line, file=terminal, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            terminal.close()


if __name__ == "__main__":
    sys.exit(main())
