"""``make run``: the whole product on embedded defaults, end to end, in one process.

1. creates (once) an embedded SQLite warehouse under ``.demo/`` with realistic Segment data for the
   last hours: several event types and customers, late-loaded and duplicate rows, anonymous events;
2. starts the local Orb and Kable sandboxes on loopback (their accepted events persist in ``.demo/``);
3. runs the real DAGs ``segment_to_orb`` and ``segment_to_kable`` hour by hour with ``dag.test()``,
   against Airflow connections pointing at the warehouse and the sandboxes;
4. prints what each destination received, from the sandboxes' own records and the ledger.

Run it again and it delivers nothing new: the ledger skips what was delivered. ``--fresh`` starts
over. ``--hours`` and ``--events-per-hour`` size a new sample (with ``--fresh`` when one exists).

``--warehouse snowflake`` or ``--warehouse bigquery`` reads the same sample from a local emulator
instead (``usage_billing.sandbox.warehouses``: fakesnow's server in this process, bqemulator as a
subprocess from ``.venv-bqemulator``), through an Airflow connection of that warehouse's type. The
ledger cannot live in those warehouses (no enforced keys, no locks), so it goes to a SQLite file of its
own (connection ``billing_ledger``): the demo needs no PostgreSQL. The emulators keep nothing between
runs, so each run loads the same rows again (same seed, same load time); the ledger and the sandboxes
keep their state under ``.demo/<warehouse>/``, and a second run sends nothing.
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
WAREHOUSES = ("sqlite", "snowflake", "bigquery")
LEDGER_CONN_ID = "billing_ledger"
DEFAULT_HOURS = 6
DEFAULT_EVENTS_PER_HOUR = 300
DEMO_MAXIMUM_BYTES_BILLED = 2**30


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=str(PROJECT / ".demo"), help="where the demo keeps its files")
    parser.add_argument("--hours", type=int, default=None,
                        help=f"hourly runs to execute and hours of sample data (default {DEFAULT_HOURS}; "
                             f"an existing sample keeps its own)")
    parser.add_argument("--events-per-hour", type=int, default=None,
                        help=f"sample events per hour and event type (default {DEFAULT_EVENTS_PER_HOUR})")
    parser.add_argument("--fresh", action="store_true", help="delete the demo state and start over")
    parser.add_argument("--verbose", action="store_true", help="show Airflow's own task logs")
    parser.add_argument("--warehouse", choices=WAREHOUSES, default="sqlite",
                        help="where the Segment tables live: the embedded SQLite file (default) or a local emulator")
    return parser.parse_args(argv)


def _airflow_environment(state: Path, warehouse: dict, orb_url: str, kable_url: str) -> None:
    """Airflow reads its configuration at import: set everything before importing it.

    ``warehouse`` is the Airflow connection (as AIRFLOW_CONN_ JSON) the source reads."""
    home = state / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__API_AUTH__JWT_SECRET": "usage-billing-demo-" + "x" * 64,
        "AIRFLOW_CONN_SEGMENT_WAREHOUSE": json.dumps(warehouse),
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


def _ledger_engine(ledger_db: Path, settings):
    """The ledger's SQLite engine: the warehouse file itself (sqlite) or the ledger's own file."""
    from usage_billing.sources.postgres import create_engine

    return create_engine(f"sqlite:///{ledger_db}", [settings.source.schema_, settings.ledger.schema_])


def _ledger_counts(ledger_db: Path, settings) -> dict:
    from usage_billing.ledger import Ledger

    engine = _ledger_engine(ledger_db, settings)
    try:
        ledger = Ledger(engine, settings.ledger.schema_)
        ledger.create()
        return ledger.counts()
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    root = Path(args.state_dir).resolve()
    emulated = args.warehouse != "sqlite"
    state = root / args.warehouse if emulated else root
    if args.fresh and state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")

    from usage_billing import sample_data
    from usage_billing.sandbox import KableSandbox, OrbSandbox, ServerOptions
    from usage_billing.settings import load_settings
    from usage_billing.sources.postgres import create_engine

    settings = _emulator_settings(state, args.warehouse) if emulated else load_settings()
    warehouse_db = state / "warehouse.db"
    # With an emulated warehouse the ledger has a file of its own; the embedded one shares the warehouse's.
    ledger_db = state / "ledger.db" if emulated else warehouse_db
    marker = state / "sample.json"
    sample = json.loads(marker.read_text()) if marker.exists() else None
    args.hours, args.events_per_hour = sample_size(args.hours, args.events_per_hour, sample, state)
    now = datetime.now(UTC)
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    first_hour = last_hour - timedelta(hours=args.hours)
    if sample:
        first_hour, now = datetime.fromisoformat(sample["first_hour"]), datetime.fromisoformat(sample["created_at"])
    # Six hours before the first run's window, for its lookback; the same rows for the same marker.
    warehouse_sample = sample_data.Sample(first_hour - timedelta(hours=6), args.hours + 6, args.events_per_hour,
                                          seed=7, now=now)
    if not emulated:
        engine = create_engine(f"sqlite:///{warehouse_db}", [settings.source.schema_, settings.ledger.schema_])
        if not sample:
            stats = sample_data.generate(engine, settings.source.schema_, warehouse_sample)
            print(f"warehouse: created {warehouse_db.name} with {stats.rows} Segment rows "
                  f"({stats.duplicates} duplicates, {stats.anonymous} anonymous, {stats.late} loaded late) "
                  f"in {settings.source.schema_}.{{{', '.join(stats.per_event)}}}")
        else:
            print(f"warehouse: reusing {warehouse_db} (make run ARGS=--fresh starts over)")
        engine.dispose()
    if not sample:
        marker.write_text(json.dumps({"created_at": now.isoformat(), "first_hour": first_hour.isoformat(),
                                      "hours": args.hours, "events_per_hour": args.events_per_hour}))

    log_path = state / "airflow-tasks.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    with contextlib.ExitStack() as stack:
        orb = stack.enter_context(OrbSandbox(api_key=API_KEYS["orb"],
                                             server=ServerOptions(state_file=state / "orb-accepted.jsonl")))
        kable = stack.enter_context(KableSandbox(client_id=API_KEYS["kable_client"], api_key=API_KEYS["kable"],
                                                 server=ServerOptions(state_file=state / "kable-accepted.jsonl")))
        before = {"orb": len(orb.accepted()), "kable": len(kable.accepted())}
        if emulated:
            emulator = stack.enter_context(_emulator(args.warehouse))
            _airflow_environment(state, emulator.connection, orb.url, kable.url)
            os.environ[f"AIRFLOW_CONN_{LEDGER_CONN_ID.upper()}"] = json.dumps({"conn_type": "sqlite",
                                                                              "host": str(ledger_db)})
            # The emulator starts empty every time: the same rows (same seed, same load time) again.
            rows = sample_data.generate_rows(warehouse_sample)
            emulator.load(settings.source.schema_, rows)
            stats = sample_data.summarize(rows)
            print(f"warehouse: {emulator.description}; loaded {stats.rows} Segment rows ({stats.duplicates} "
                  f"duplicates, {stats.anonymous} anonymous, {stats.late} loaded late) into "
                  f"{emulator.location(settings.source.schema_)}.{{{', '.join(stats.per_event)}}}")
            print(f"ledger: SQLite {ledger_db} (connection {LEDGER_CONN_ID}; {args.warehouse} cannot hold it)")
        else:
            _airflow_environment(state, {"conn_type": "sqlite", "host": str(warehouse_db)}, orb.url, kable.url)
        print(f"running segment_to_orb and segment_to_kable for {args.hours} hours "
              f"(Airflow task logs: {log_path})", flush=True)
        sandboxes = {"orb": orb, "kable": kable}

        def progress(name: str) -> dict:
            counts = _ledger_counts(ledger_db, settings).get(name, {})
            return {"accepted": len(sandboxes[name].accepted()), "rejected": counts.get("rejected", 0)}

        runs = _run_dags(first_hour, args.hours, args.verbose, log_path, progress)
        new = {"orb": orb.accepted()[before["orb"]:], "kable": kable.accepted()[before["kable"]:]}
        totals = {"orb": len(orb.accepted()), "kable": len(kable.accepted())}

    from usage_billing.ledger import Ledger

    engine = _ledger_engine(ledger_db, settings)
    ledger = Ledger(engine, settings.ledger.schema_)
    counts = ledger.counts()
    print()
    print(f"Delivery report: {args.hours} hourly runs per DAG, windows {first_hour:%Y-%m-%d %H:00} .. "
          f"{first_hour + timedelta(hours=args.hours):%H:00} UTC, lookback {settings.source.lookback}"
          + (f", source {args.warehouse} (emulated), loaded-at column {settings.source.loaded_at_column}"
             if emulated else ""))
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
    if emulated and not args.verbose:
        lines += _cost_lines(log_path, log_offset, args.warehouse)
    print("\n".join(lines))
    engine.dispose()
    if not new["orb"] and not new["kable"]:
        print("Nothing new was delivered: every event in these windows is already in the ledger.")
    return 1 if any(runs.values()) else 0


def sample_size(hours: int | None, events_per_hour: int | None, sample: dict | None,
                state: Path) -> tuple[int, int]:
    """Hours to run and events per hour: the flags' (or the defaults) for a new sample; an existing
    sample's own, since its rows cover only its hours (an emulator is refilled with exactly them).
    A size that contradicts the existing sample fails, naming ``--fresh``, instead of being ignored."""
    if not sample:
        return (DEFAULT_HOURS if hours is None else hours,
                DEFAULT_EVENTS_PER_HOUR if events_per_hour is None else events_per_hour)
    kept = {"--hours": sample.get("hours", DEFAULT_HOURS),
            "--events-per-hour": sample.get("events_per_hour", DEFAULT_EVENTS_PER_HOUR)}
    asked = {"--hours": hours, "--events-per-hour": events_per_hour}
    conflicts = [f"{flag} {asked[flag]}" for flag in kept if asked[flag] is not None and asked[flag] != kept[flag]]
    if conflicts:
        raise SystemExit(f"make run: the sample in {state} was made with --hours {kept['--hours']} "
                         f"--events-per-hour {kept['--events-per-hour']}; for {' '.join(conflicts)} add --fresh "
                         f"(it starts over with a new sample)")
    return kept["--hours"], kept["--events-per-hour"]


def _emulator_settings(state: Path, warehouse: str):
    """The shipped configuration with the ledger on its own connection (a warehouse cannot host it) and,
    on BigQuery, Segment's ``loaded_at`` as the loaded-at column; written to ``state`` for the tasks."""
    import yaml

    from usage_billing.settings import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH, load_settings

    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    config["ledger"] = {**config.get("ledger", {}), "conn_id": LEDGER_CONN_ID}
    if warehouse == "bigquery":
        config["source"]["loaded_at_column"] = "loaded_at"
        # Every query carries the byte cap (default 100 GiB); the sample needs far less than 1 GiB.
        config["source"]["maximum_bytes_billed"] = DEMO_MAXIMUM_BYTES_BILLED
    path = state / "usage_billing.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    os.environ[CONFIG_ENV_VAR] = str(path)
    return load_settings(path)


class _Emulator:
    """A started warehouse emulator: its Airflow connection, how to load it, how to name it."""

    def __init__(self, connection: dict, load: Callable, description: str, location: Callable[[str], str]):
        self.connection, self.load, self.description, self.location = connection, load, description, location


@contextlib.contextmanager
def _emulator(warehouse: str) -> Iterator[_Emulator]:
    from usage_billing.sandbox import warehouses

    if warehouse == "snowflake":
        database = "segment_events"
        with warehouses.fakesnow_server() as server:
            yield _Emulator(warehouses.snowflake_connection(server.port, database),
                            lambda schema, rows: warehouses.load_snowflake("segment_warehouse", schema, rows),
                            f"Snowflake emulated by fakesnow's server on https://127.0.0.1:{server.port}",
                            lambda schema: f"{database}.{schema}".upper())
        return
    with warehouses.bqemulator_server() as emulator:
        yield _Emulator(warehouses.bigquery_connection(emulator),
                        lambda schema, rows: warehouses.load_bigquery(emulator, schema, rows),
                        f"BigQuery emulated by bqemulator on {emulator.api_endpoint} (Storage Read "
                        f"{emulator.read_api_endpoint})", lambda schema: f"{emulator.project}.{schema}")


def _cost_lines(log_path: Path, offset: int, warehouse: str) -> list[str]:
    """What the warehouse reported, from this run's deliver-task summaries (their ``warehouse`` line)."""
    try:
        with log_path.open(encoding="utf-8", errors="replace") as log:
            log.seek(offset)
            costs = [line.split("warehouse", 1)[1].strip() for line in log if "  warehouse         " in line]
    except OSError:
        return []
    if not costs:
        return []
    return [f"  {warehouse} (emulated) as the deliver tasks reported it: {len(costs)} task summaries, e.g.",
            *(f"      {cost}" for cost in costs[-2:])]


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
