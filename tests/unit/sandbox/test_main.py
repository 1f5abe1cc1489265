"""``python -m usage_billing.sandbox`` (``usage_billing.sandbox.__main__``): both sandboxes in a process of
their own, stopped by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from tests.conftest import PROJECT
from tests.unit.sandbox.conftest import (
    KABLE_CREATE,
    kable_event,
    orb_event,
)

pytestmark = pytest.mark.timeout(60)


def test_cli_runs_both_sandboxes_until_sigterm(tmp_path: Path) -> None:
    include = PROJECT / "include"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(include), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "usage_billing.sandbox",
        "--orb-port",
        "0",
        "--kable-port",
        "0",
        "--orb-api-key",
        "K",
        "--kable-client-id",
        "C",
        "--kable-api-key",
        "S",
        "--latency",
        "0.01",
        "--state-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line_holder: list[str] = []
        reader = threading.Thread(target=lambda: line_holder.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=15)
        assert line_holder and line_holder[0], proc.stderr.read() if proc.poll() is not None else "no output"
        info = json.loads(line_holder[0])
        assert info["pid"] == proc.pid
        assert info["orb_url"].startswith("http://127.0.0.1:") and info["kable_url"].startswith("http://127.0.0.1:")

        assert requests.get(f"{info['orb_url']}/_sandbox/health", timeout=5).status_code == 200
        resp = requests.post(
            f"{info['orb_url']}/v1/ingest",
            json={"events": [orb_event("k")]},
            headers={"Authorization": "Bearer K"},
            timeout=5,
        )
        assert resp.status_code == 200
        resp = requests.post(
            f"{info['kable_url']}{KABLE_CREATE}",
            json=[kable_event("t")],
            headers={"KABLE-CLIENT-ID": "C", "KABLE-CLIENT-SECRET": "S"},
            timeout=5,
        )
        assert resp.status_code == 200
        accepted = requests.get(f"{info['kable_url']}/_sandbox/events", timeout=5).json()["accepted"]
        assert [e["transactionId"] for e in accepted] == ["t"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert (tmp_path / "orb-events.jsonl").read_text().count("\n") == 1
    assert (tmp_path / "kable-events.jsonl").read_text().count("\n") == 1


def test_cli_gc_freezes_survivors_and_still_collects_new_cycles() -> None:
    include = PROJECT / "include"
    code = """
import gc
from usage_billing.sandbox.__main__ import freeze_survivors
freeze_survivors()
frozen = gc.get_freeze_count()
kept = [{"n": i, "properties": {}} for i in range(5000)]
gc.collect()
assert gc.get_freeze_count() >= frozen + 5000, (frozen, gc.get_freeze_count())
cycle = []
cycle.append(cycle)
del cycle
assert gc.collect() >= 1
"""
    env = {**os.environ, "PYTHONPATH": str(include)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
