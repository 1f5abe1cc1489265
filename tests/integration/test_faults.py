"""Exactly-once under a killed task, overlapping runs, random faults; secrets never leak.

Same invariant as test_delivery: every deliverable event accepted exactly once by the sandbox,
every other event rejected with a reason in the ledger, nothing lost.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from tests.conftest import PROJECT
from tests.integration.conftest import KABLE_KEY, ORB_KEY, config, connection_env, make_world
from tests.integration.test_delivery import assert_exactly_once
from usage_billing.delivery import DeliveryFailed
from usage_billing.destinations import DESTINATIONS
from usage_billing.sandbox import Fault, ServerOptions
from usage_billing.sources import Window


@pytest.mark.parametrize("name", list(DESTINATIONS))
def test_a_task_killed_mid_delivery_is_completed_by_its_retry(name, pg_engine, pg_url, schemas, monkeypatch):
    for world in make_world(name, pg_engine, schemas, monkeypatch, sandbox_options={"server": ServerOptions(latency=0.15)},
                            destination_overrides={name: {"batch_size": 10}}):
        args = {"config": config(*schemas, **{"orb": {}, "kable": {}} | {name: {"batch_size": 10}}),
                "destination": name, "database_url": pg_url, "window": world.window().to_dict(), "run_id": "r1"}
        env = {**os.environ, **connection_env(name, world.sandbox.url),
               "PYTHONPATH": os.pathsep.join([str(PROJECT / "include"), str(PROJECT / "plugins"), str(PROJECT)])}
        child = subprocess.Popen([sys.executable, "-m", "tests.integration.deliver_child", json.dumps(args)],
                                 cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while len(world.sandbox.accepted()) < 40 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert child.poll() is None, child.stdout.read().decode()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        time.sleep(0.5)  # requests already in the sandbox finish (latency 0.15 s) though the client is gone
        partial = world.sandbox.accepted_keys()
        assert 0 < len(partial) < len(world.deliverable_ids())

        # The dead process's partition lock died with its database session: Airflow's retry (or
        # any overlapping run) proceeds at once and sends only what the ledger does not have.
        marked = world.ledger_keys("delivered")
        assert marked <= partial, "only confirmed events were marked"
        rejected = world.ledger_keys("rejected")  # rows rejected before the kill are settled too
        retry = world.deliver(run="r1")
        assert sum(r.already_delivered for r in retry) == len(marked) + len(rejected)
        assert_exactly_once(world)
        # Confirmed-but-unmarked events (the crash window) were sent again with the same keys and
        # de-duplicated by the destination: at most one unmarked mark-interval of them.
        assert world.sandbox.duplicates == len(partial - marked)


def test_overlapping_runs_in_parallel_send_each_event_once(world):
    """A UI backfill and the hourly run (and more) over overlapping windows, all at once."""
    full = world.window()
    middle = full.start + (full.end - full.start) / 2
    windows = [full, Window(full.start, middle), Window(middle - timedelta(hours=12), full.end), full]
    with ThreadPoolExecutor(max_workers=len(windows)) as pool:
        list(pool.map(lambda item: world.deliver(run=f"run-{item[0]}", hook=world.hook(), window=item[1]),
                      enumerate(windows)))
    assert world.sandbox.duplicates == 0, "no event was sent twice"
    assert_exactly_once(world)


def test_seeded_random_faults_end_exactly_once(world):
    world.sandbox.set_random_faults(rate=0.3, seed=7)
    failures = 0
    for attempt in range(8):
        try:
            world.deliver(run="soak")
            break
        except DeliveryFailed:
            failures += 1
    else:
        pytest.fail("still failing after 8 tries at a 30% fault rate")
    world.sandbox.set_random_faults(rate=0)
    assert_exactly_once(world)
    assert sum(1 for r in world.sandbox.requests if r.fault) > 0


def test_secrets_never_reach_logs_errors_or_the_ledger(world, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    world.sandbox.inject(Fault.SERVER_ERROR, times=1000)
    with pytest.raises(DeliveryFailed) as failure:
        world.deliver(run="doomed", tables=["api_call"])
    world.sandbox.clear_faults()
    for fault, options in [(Fault.TOO_MANY_REQUESTS, {"retry_after": 0}), (Fault.SERVER_ERROR, {}),
                           (Fault.RESET, {}), (Fault.LOST_RESPONSE, {}), (Fault.BAD_REQUEST, {}),
                           (Fault.SLOW, {"delay": 3})]:
        world.sandbox.inject(fault, times=1, **options)
    world.deliver(hook=world.hook(max_attempts=10))
    assert_exactly_once(world)
    captured = capfd.readouterr()  # Airflow's structlog writes hook warnings straight to the stream
    logs = caplog.text + captured.out + captured.err
    texts = [logs, str(failure.value), repr(failure.value.__cause__)]
    texts += [json.dumps(row, default=str) for row in world.ledger.rejected(world.name)]
    for secret in (ORB_KEY, KABLE_KEY):
        for text in texts:
            assert secret not in text
    assert "retry" in logs and "gave up after" in logs + str(failure.value), "the faults were logged"
