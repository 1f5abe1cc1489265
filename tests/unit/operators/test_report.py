"""The report task adds the partitions up, and refreshes the ledger's statistics for the next run."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
from airflow.sdk.exceptions import AirflowFailException

from billing_airflow.operators import deliver
from billing_airflow.operators.deliver import DeliveryReportOperator

PARTITION = {"partition": "api_call", "unique_events": 10, "accepted": 10, "sent": 10, "rejected": 0,
             "rejected_before": 0, "top_reasons": []}


class TaskInstance:
    def __init__(self, planned, delivered):
        self.pulled = {"plan": planned, "deliver": delivered}

    def xcom_pull(self, task_ids):
        return self.pulled[task_ids]


class Ledger:
    schema = "usage_billing"

    def __init__(self, stale: bool = True, error: Exception | None = None):
        self.stale, self.error, self.refreshed = stale, error, 0

    def refresh_statistics(self) -> bool:
        if self.error:
            raise self.error
        self.refreshed += 1
        return self.stale


@pytest.fixture
def ledger(monkeypatch):
    book = Ledger()
    monkeypatch.setattr(deliver, "open_ledger", lambda settings: contextlib.nullcontext(book))
    return book


def report(planned, delivered) -> dict:
    operator = DeliveryReportOperator(task_id="report", destination="orb", deliver_task_id="deliver",
                                      plan_task_id="plan")
    return operator.execute({"ti": TaskInstance(planned, delivered)})


def test_the_report_refreshes_the_ledger_statistics_once_after_the_deliveries(ledger, capsys):
    assert report([{"table": "api_call"}], PARTITION)["accepted"] == 10
    assert ledger.refreshed == 1
    assert "statistics refreshed (ANALYZE)" in capsys.readouterr().out  # Airflow's task logger writes to stdout


def test_a_failed_partition_still_refreshes_them(ledger):
    with pytest.raises(AirflowFailException, match="1 of 2 partitions did not finish"):
        report([{"table": "api_call"}, {"table": "tokens_used"}], PARTITION)
    assert ledger.refreshed == 1


def test_a_failed_refresh_only_warns(monkeypatch, capsys):
    book = Ledger(error=RuntimeError("permission denied for table deliveries"))
    monkeypatch.setattr(deliver, "open_ledger", lambda settings: contextlib.nullcontext(book))
    assert report([{"table": "api_call"}], PARTITION)["accepted"] == 10
    assert "ledger statistics not refreshed (permission denied for table deliveries)" in capsys.readouterr().out


def test_refreshing_the_statistics_imports_neither_pandas_nor_alembic():
    """The report task imports the ledger only to ANALYZE it (in a fresh interpreter: this one has both)."""
    script = "import sys, usage_billing.ledger; print(sorted(m for m in ('pandas', 'numpy', 'alembic') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
