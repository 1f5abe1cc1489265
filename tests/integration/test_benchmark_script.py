"""Smoke test of scripts/benchmark.py: a tiny window end to end against PostgreSQL and the sandbox.

Not a performance test (the timings of 3,000 events mean nothing): it checks that the script runs
the real pipeline, the rerun, the floor and the capacity probe, and the DAG run through Airflow
(``airflow dags test``, and under a scheduler with a LocalExecutor) with its rerun, prints every part
of its report, and that what it delivered adds up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import PROJECT, TEST_DATABASE_URL

pytestmark = pytest.mark.timeout(300)

STAGES = ("extract", "transform", "ledger_filter", "deliver", "ledger_write")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def run() -> subprocess.CompletedProcess:
    env = {**os.environ, "TEST_DATABASE_URL": TEST_DATABASE_URL}
    return subprocess.run(
        [sys.executable, str(PROJECT / "scripts" / "benchmark.py"), "--events", "3000", "--latency", "0",
         "--rerun", "--capacity-seconds", "0.3", "--concurrency", "4", "--core-only"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=110, check=False)


def test_the_benchmark_exits_cleanly(run):
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_every_stage_the_floor_and_peak_memory_are_reported(run):
    out = run.stdout
    for stage in STAGES:
        assert re.search(rf"^\s+{stage}\s+\d+\.\d+\s", out, re.MULTILINE), f"no {stage} line in:\n{out}"
    assert re.search(r"^\s+total \(wall\)\s+\d+\.\d+\s", out, re.MULTILINE), out
    assert re.search(r"^\s+floor: \d+\.\d+ s for [\d,]+ rows read", out, re.MULTILINE), out
    assert re.search(r"^\s+core / floor\s+\d+\.\d+ x", out, re.MULTILINE), out
    assert re.search(r"peak memory: [\d,]+ MB ru_maxrss", out), out
    assert re.search(r"sandbox capacity at concurrency\s+4: .* events/s", out), out
    assert "== targets" in out, out


def test_everything_deliverable_was_delivered_once_and_the_rerun_sent_nothing(run):
    out = run.stdout
    window = re.search(r"([\d,]+) unique events, ([\d,]+) deliverable", out)
    assert window, out
    unique, deliverable = _number(window.group(1)), _number(window.group(2))
    # About 3,000 events in the window, most of them with a customer id.
    assert 2_900 <= unique <= 3_200 and 0.9 * unique <= deliverable < unique, out
    checks = re.findall(r"check: delivered (\d+) deliverable (\d+)", out)
    assert len(checks) == 2, out  # the first run and the rerun
    for delivered, expected in checks:
        assert int(delivered) == int(expected) == deliverable
    sandbox = re.search(r"sandbox answered 2xx to ([\d,]+) events", out)
    assert sandbox and _number(sandbox.group(1)) == deliverable, out
    rerun = re.search(r"rerun sent (\d+), skipped ([\d,]+) already settled", out)
    # Skipped: the delivered events, and the rejected ones from the same load of their rows.
    assert rerun and int(rerun.group(1)) == 0 and _number(rerun.group(2)) == unique, out
    floor = re.search(r"floor: .* ([\d,]+) events posted", out)
    assert floor and _number(floor.group(1)) == deliverable, out
    assert "CORRECTNESS CHECKS FAILED" not in out


@pytest.fixture(scope="module")
def as_run() -> subprocess.CompletedProcess:
    env = {**os.environ, "TEST_DATABASE_URL": TEST_DATABASE_URL}
    return subprocess.run(
        [sys.executable, str(PROJECT / "scripts" / "benchmark.py"), "--events", "3000", "--latency", "0",
         "--airflow-only", "--runner", "dags-test", "--capacity-seconds", "0", "--concurrency", "4"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=280, check=False)


def test_the_dag_run_through_airflow_and_its_rerun_are_timed_and_broken_down(as_run):
    out = as_run.stdout
    assert as_run.returncode == 0, out[-3000:] + as_run.stderr[-3000:]
    assert "CORRECTNESS CHECKS FAILED" not in out
    runs = re.findall(r"airflow dags test segment_to_orb \S+: (\d+\.\d+) s from process start to the last task's "
                      r"end .* dag run success; ([\d,]+) events, ([\d,]+) sent, ([\d,]+) already settled", out)
    assert len(runs) == 2, out  # the run and its rerun
    (_, events, sent, skipped), (_, events_again, sent_again, skipped_again) = runs
    assert _number(events) == _number(events_again) and _number(skipped) == 0
    assert _number(sent) > 0 and _number(sent_again) == 0
    assert _number(skipped_again) == _number(events), "the rerun skips every event: delivered or rejected before"
    for part in ("process start, Python and Airflow imports", "DAG parsing", "metadata database",
                 "in-process Execution API start", "plan (execute)", "deliver (execute, 3 mapped tasks)",
                 "report (execute)", "between tasks"):
        assert len(re.findall(rf"^\s+{re.escape(part)}.*\s\d+\.\d+\s+-?\d+\.\d+%$", out, re.MULTILINE)) == 2, part
    assert re.search(r"deliver stages .*: extract \d+\.\d+, transform", out), out
    assert re.search(r"peak memory of the airflow process .*: [\d,]+ MB", out), out
    assert re.search(r"^\s+as run / floor\s+\d+\.\d+ x", out, re.MULTILINE), out


@pytest.fixture(scope="module")
def under_scheduler() -> subprocess.CompletedProcess:
    env = {**os.environ, "TEST_DATABASE_URL": TEST_DATABASE_URL}
    return subprocess.run(
        [sys.executable, str(PROJECT / "scripts" / "benchmark.py"), "--events", "3000", "--latency", "0",
         "--airflow-only", "--runner", "scheduler", "--capacity-seconds", "0", "--concurrency", "4",
         "--skip-floor", "--scheduler-idle-sleep", "0.2"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=280, check=False)


def test_the_dag_run_under_a_scheduler_and_its_cleared_rerun_are_timed_from_the_request(under_scheduler):
    out = under_scheduler.stdout
    assert under_scheduler.returncode == 0, out[-3000:] + under_scheduler.stderr[-3000:]
    assert "CORRECTNESS CHECKS FAILED" not in out
    assert re.search(r"scheduler \(LocalExecutor, parallelism 8, scheduler_idle_sleep_time 0.2 s\).* warm-up run", out)
    runs = re.findall(r"POST /api/v2/dags/segment_to_orb/dagRuns(/benchmark_0_0/clear| \(logical date \S+\)); "
                      r"scheduler, LocalExecutor, parallelism 8: (\d+\.\d+) s from the request to the last task's end; "
                      r"dag run success; ([\d,]+) events, ([\d,]+) sent, ([\d,]+) already settled", out)
    assert [r[0].startswith("/benchmark") for r in runs] == [False, True], out  # triggered, then cleared
    (_, _, events, sent, skipped), (_, _, events_again, sent_again, skipped_again) = runs
    assert _number(events) == _number(events_again) and _number(skipped) == 0 and _number(sent) > 0
    assert _number(sent_again) == 0 and _number(skipped_again) == _number(events)
    for part in ("request -> first task running", "gate (task start to end)", "plan (task start to end)",
                 "deliver (3 mapped tasks side by side, start to end)", "report (task start to end)",
                 "between tasks"):
        assert len(re.findall(rf"^\s+{re.escape(part)}.*\s\d+\.\d+\s+-?\d+\.\d+%$", out, re.MULTILINE)) == 2, part
    assert re.search(r"peak memory of a deliver task process \(VmHWM, its largest\): [\d,]+ MB", out), out
