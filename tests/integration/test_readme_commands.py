"""The README's ledger commands as written: every ``python -m usage_billing.cli`` line of its shell blocks run
in a subprocess from the project directory (its placeholders swapped for a throwaway ledger: the PostgreSQL
URL for the test server, ``.demo/warehouse.db`` for a SQLite file, the schema through ``USAGE_BILLING_CONFIG``),
and its SQL queries run against such a ledger. A README line that no longer runs, or prints other than it
says, fails here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import PROJECT
from tests.integration.conftest import config
from usage_billing.destinations.base import Rejection
from usage_billing.ledger import EventRefs, Ledger, RunRef, migrate
from usage_billing.sources.postgres import create_engine

README = (PROJECT / "README.md").read_text(encoding="utf-8")
#: What the README's ledger commands name, and what stands in for it here.
PG_PLACEHOLDER = "postgresql+psycopg2://user@host/db"
DEMO_LEDGER = "sqlite:///.demo/warehouse.db"
RUN = RunRef("segment_to_orb", "scheduled__readme")
T0 = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
NO_CUSTOMER = "no external customer ID: external_customer_id_field 'userId' (column user_id) is empty"
TOO_LONG = "property 'plan' is longer than max_string_length (512)"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def cli_lines(command: str) -> list[str]:
    return [line for block in blocks("bash") for line in block.splitlines()
            if "-m usage_billing.cli" in line and f" {command}" in line]


def sql_block(containing: str) -> str:
    [query] = [block for block in blocks("sql") if containing in block]
    return query


def on_schema(query: str, schema: str) -> str:
    return query.replace("usage_billing.", f'"{schema}".')


@pytest.fixture
def run_line(pg_url: str, tmp_path: Path, schemas: tuple[str, str]):
    """Run one README line with bash from the project directory, as a reader would; (exit status, stdout)."""
    source, ledger_schema = schemas
    settings = tmp_path / "usage_billing.yaml"
    settings.write_text(yaml.safe_dump(config(source, ledger_schema)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the line itself must say what it needs
    env["USAGE_BILLING_CONFIG"] = str(settings)

    def run(line: str) -> tuple[int, str]:
        assert PG_PLACEHOLDER in line or DEMO_LEDGER in line, f"which ledger does this README line use? {line}"
        line = (line.replace(PG_PLACEHOLDER, pg_url).replace(DEMO_LEDGER, f"sqlite:///{tmp_path}/warehouse.db")
                .replace(".venv/bin/python ", f"{shlex.quote(sys.executable)} "))
        done = subprocess.run(["bash", "-c", line], cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert "Traceback" not in done.stderr, done.stderr
        return done.returncode, done.stdout

    return run


def by_reason(out: str) -> list[tuple[str, int]]:
    """The command's `<count> x <reason>` lines."""
    return [(reason, int(count)) for count, reason in re.findall(r"^ +(\d+) x (.*)$", out, re.MULTILINE)]


def rejections(keys: list[str], table: str, reason: str) -> list[Rejection]:
    return [Rejection(key, key, table, f"{table} row id={key}: {reason}", T0) for key in keys]


def test_the_upgrade_lines_create_the_ledger_then_report_the_revision_as_the_readme_shows(run_line, pg_engine,
                                                                                         schemas):
    upgrade, check = cli_lines("ledger-upgrade")
    assert "--check" in check and "--check" not in upgrade
    schema = schemas[1]
    assert run_line(check) == (1, f"ledger {schema}: revision (none), newest {migrate.head()}\n"), "behind"

    assert run_line(upgrade) == (0, f"ledger {schema}: revision (none), newest {migrate.head()}\n"
                                    f"ledger {schema}: upgraded to {migrate.head()}\n")
    code, out = run_line(check)
    [shown] = re.findall(r"^# (ledger usage_billing: .*?)\s{2,}\(", README, re.MULTILINE)
    assert (code, out) == (0, shown.replace("usage_billing", schema) + "\n"), "the README shows the newest revision"

    [version_query] = re.findall(r"`(SELECT version_num FROM usage_billing\.alembic_version;)`", README)
    with pg_engine.connect() as conn:
        assert conn.execute(sa.text(on_schema(version_query, schema))).scalar_one() == migrate.head()


def test_the_rejected_lines_list_rejections_by_reason_from_postgresql_and_the_demo_ledger(run_line, pg_engine,
                                                                                          schemas, tmp_path):
    schema = schemas[1]
    ledger = Ledger(pg_engine, schema)
    ledger.create()
    ledger.mark_rejected("orb", RUN, rejections(["a1", "a2", "a3"], "api_call", NO_CUSTOMER), T0)
    ledger.mark_rejected("orb", RUN, rejections(["t1"], "tokens_used", TOO_LONG), T0)
    ledger.mark_delivered("orb", RUN, EventRefs(["d1"], ["d1"], ["api_call"], [T0]), T0)
    demo = create_engine(f"sqlite:///{tmp_path}/warehouse.db", [schema])
    try:
        Ledger(demo, schema).create()
        Ledger(demo, schema).mark_rejected("kable", RUN, rejections([f"k{i}" for i in range(7)], "api_call",
                                                                   "no client ID"), T0)
    finally:
        demo.dispose()

    from_postgres, from_demo = cli_lines("rejected")
    code, out = run_line(from_postgres)
    assert code == 0, out
    assert by_reason(out) == [(NO_CUSTOMER, 3), (TOO_LONG, 1)]
    assert len(re.findall(r"^  (a\d|t1)  ", out, re.MULTILINE)) == 4 and "d1" not in out

    code, out = run_line(from_demo)
    assert code == 0, out
    assert by_reason(out) == [("no client ID", 7)]
    assert len(re.findall(r"^  k\d  ", out, re.MULTILINE)) == 5, "--limit 5"

    query = sql_block("FROM usage_billing.deliveries")
    with pg_engine.connect() as conn:
        by_sql = [tuple(row) for row in conn.execute(sa.text(on_schema(query, schema)))]
    assert by_sql == [(NO_CUSTOMER, 3), (TOO_LONG, 1)] == ledger.rejected_reasons("orb")


def test_the_day_counts_query_shows_what_the_sweep_counted_and_what_is_missing(pg_engine, schemas):
    schema = schemas[1]
    ledger = Ledger(pg_engine, schema)
    ledger.create()
    counted = {date(2026, 11, 21): {"warehouse": 4210, "delivered": 4163, "rejected": 47, "held": 0},
               date(2026, 11, 22): {"warehouse": 100, "delivered": 90, "rejected": 3, "held": 2}}
    ledger.record_day_counts("orb", counted, RUN, T0)
    with pg_engine.connect() as conn:
        rows = conn.execute(sa.text(on_schema(sql_block("FROM usage_billing.day_counts"), schema))).all()
    assert [(r.day, r.destination, r.warehouse, r.missing, r.counted_at) for r in rows] == [
        (date(2026, 11, 21), "orb", 4210, 0, T0), (date(2026, 11, 22), "orb", 100, 5, T0)]
