"""``make run ARGS="--warehouse snowflake"`` and ``--warehouse bigquery`` as a user runs them: the demo in a
subprocess on the smallest sample (one hour, ten events per hour and table), then again.

The first run delivers every deliverable event of the scanned window to each sandbox exactly once and
the ledger agrees with the sandboxes; the second run (the emulator refilled with the same rows) sends
nothing. EMULATED: fakesnow's server and bqemulator stand in for the warehouses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from usage_billing import demo, sample_data
from usage_billing.ledger import Ledger
from usage_billing.sandbox import warehouses
from usage_billing.sources.postgres import create_engine

# The column each warehouse's demo windows on (BigQuery: Segment's loaded_at, the rows' uuid_ts here).
LOADED_AT = {"snowflake": "received_at", "bigquery": "uuid_ts"}


def installed(warehouse: str) -> bool:
    if warehouse == "snowflake":
        return importlib.util.find_spec("fakesnow") is not None
    return (warehouses.BQEMULATOR_VENV / "bin" / "bqemulator").exists()


def make_run(state: Path, warehouse: str) -> str:
    """``make run ARGS="--warehouse <w> --hours 1 --events-per-hour 10"`` (what the Makefile runs); its output."""
    done = subprocess.run([sys.executable, "-m", "usage_billing.demo", "--state-dir", str(state), "--warehouse",
                           warehouse, "--hours", "1", "--events-per-hour", "10"],
                          cwd=PROJECT, env={**os.environ, "MALLOC_ARENA_MAX": "2"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    return done.stdout


def accepted(path: Path, key: str) -> list[str]:
    return [json.loads(line)[key] for line in path.read_text().splitlines() if line.strip()]


def ledger_counts(state: Path) -> dict:
    engine = create_engine(f"sqlite:///{state / 'ledger.db'}", ["prod_api", "usage_billing"])
    try:
        return Ledger(engine, "usage_billing").counts()
    finally:
        engine.dispose()


@pytest.mark.parametrize("warehouse", ["snowflake", "bigquery"])
def test_make_run_on_an_emulated_warehouse_delivers_the_window_exactly_once_and_again_sends_nothing(
        warehouse, tmp_path):
    if not installed(warehouse):
        pytest.skip(f"the {warehouse} emulator is not installed")
    out = make_run(tmp_path, warehouse)
    state = tmp_path / warehouse
    sample = json.loads((state / "sample.json").read_text())
    assert (sample["hours"], sample["events_per_hour"]) == (1, 10)

    # The rows the demo loaded (same seed, same load time) and the window its one run scanned.
    first_hour = datetime.fromisoformat(sample["first_hour"])
    rows = sample_data.generate_rows(sample_data.Sample(first_hour - timedelta(hours=6), 7, 10, seed=7,
                                                        now=datetime.fromisoformat(sample["created_at"])))
    scanned = {row["id"]: row for batch in rows.values() for row in batch
               if first_hour - timedelta(hours=6) <= row[LOADED_AT[warehouse]] < first_hour + timedelta(hours=1)}
    deliverable = {i for i, row in scanned.items() if row["user_id"]}
    assert deliverable and len(deliverable) < len(scanned), "anonymous rows are in the window too"

    orb = accepted(state / "orb-accepted.jsonl", "idempotency_key")
    kable = accepted(state / "kable-accepted.jsonl", "transactionId")
    assert set(orb) == set(kable) == deliverable, "every deliverable event of the window reached both sandboxes"
    assert len(orb) == len(set(orb)) and len(kable) == len(set(kable)), "none twice"
    counts = ledger_counts(state)
    anonymous = len(scanned) - len(deliverable)
    assert counts == {name: {"delivered": len(deliverable), "rejected": anonymous} for name in ("orb", "kable")}
    assert f"sandbox total {len(deliverable)}; ledger {counts['orb']}" in out
    assert f"{warehouse} (emulated) as the deliver tasks reported it" in out

    again = make_run(tmp_path, warehouse)
    assert "Nothing new was delivered" in again, again[-2000:]
    assert accepted(state / "orb-accepted.jsonl", "idempotency_key") == orb, "the second run sent nothing"
    assert accepted(state / "kable-accepted.jsonl", "transactionId") == kable
    assert ledger_counts(state) == counts


def test_the_bigquery_demo_sets_the_byte_cap_explicitly(tmp_path, monkeypatch):
    """The BigQuery demo's configuration sets the byte cap explicitly (the setting shown where it is used)."""
    monkeypatch.setenv("USAGE_BILLING_CONFIG", "")
    settings = demo._emulator_settings(tmp_path, "bigquery")
    assert settings.source.maximum_bytes_billed == demo.DEMO_MAXIMUM_BYTES_BILLED
    assert settings.source.loaded_at_column == "loaded_at" and settings.ledger.conn_id == demo.LEDGER_CONN_ID
