"""Cluster.start_listening without Airflow: a start that loses its port is retried on a fresh one.

The servers are tiny Python processes; the "other process on the machine" that took the port first is
a listening socket this test holds, and ``choose_port`` hands that port out first.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from tests.celery.cluster import Cluster, ClusterError, Started, free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "logs", os.environ) as cluster:
        yield cluster


def ports(*first: int) -> Callable[[], int]:
    """A port chooser: ``first``, then free ports."""
    queue = list(first)
    return lambda: queue.pop(0) if queue else free_port()


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]


def answers(_process: Started, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


#: Like a Celery worker: serves on the port from a child process and keeps running when that child fails.
SERVER_IN_A_CHILD = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", '''
    import socket, sys, time
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError as error:
        sys.exit(f"log server: {error}")
    sock.listen()
    time.sleep(600)
    ''', sys.argv[1]])
    time.sleep(600)
""")


def test_a_server_that_exits_on_a_taken_port_is_started_again_on_a_fresh_one(cluster, taken_port):
    server, port = cluster.start_listening("web", http_server, ready=answers, choose_port=ports(taken_port),
                                           timeout=30)

    assert port != taken_port
    assert server.popen.poll() is None and port in server.listening_ports()
    assert answers(server, port)
    first = cluster.processes[0]
    assert first.name == "web" and first.stopped and first.popen.returncode not in (None, 0)
    assert "Address already in use" in first.log.read_text()
    assert cluster.retries == [f"web on port {taken_port}: the port was already in use"]
    assert server.name == "web-attempt2" and server.log.name == "web-attempt2.log"


def test_a_server_that_keeps_running_without_its_port_is_stopped_and_started_again(cluster, taken_port):
    server, port = cluster.start_listening("worker", lambda p: [sys.executable, "-c", SERVER_IN_A_CHILD, str(p)],
                                           choose_port=ports(taken_port), timeout=30)

    assert port != taken_port and port in server.listening_ports()  # held by the child
    first = cluster.processes[0]
    assert first.stopped and first.popen.returncode is not None  # its whole group, stopped
    assert "log server: [Errno 98] Address already in use" in first.log.read_text()
    assert len(cluster.retries) == 1


def test_gives_up_after_the_attempts_with_every_log_tail(cluster, taken_port):
    with pytest.raises(ClusterError) as raised:
        cluster.start_listening("web", http_server, attempts=2, choose_port=ports(taken_port, taken_port),
                                timeout=30)

    message = str(raised.value)
    assert message.startswith("web did not start in 2 attempts")
    assert "attempt 1 of 2" in message and "attempt 2 of 2" in message
    assert message.count("OSError: [Errno 98] Address already in use") == 2  # the tail of each log
    assert [p.name for p in cluster.processes] == ["web", "web-attempt2"]
    assert all(p.stopped for p in cluster.processes)
    cluster.check_running()  # the failed attempts do not count as processes that died


def test_an_early_exit_for_another_reason_is_retried_too_and_reported(cluster):
    command = lambda port: [sys.executable, "-c", f"print('cannot serve {port}'); raise SystemExit(3)"]  # noqa: E731
    with pytest.raises(ClusterError) as raised:
        cluster.start_listening("api", command, attempts=2, timeout=30)

    message = str(raised.value)
    assert message.count("exited with code 3 during start-up") == 2
    assert message.count("cannot serve") == 2
    assert len(cluster.retries) == 1


def test_a_server_that_never_listens_or_never_gets_ready_times_out(cluster):
    sleeper = lambda _port: [sys.executable, "-c", "import time; time.sleep(600)"]  # noqa: E731
    with pytest.raises(ClusterError, match=r"not listening on the port within 1 s"):
        cluster.start_listening("silent", sleeper, attempts=1, timeout=1)

    with pytest.raises(ClusterError, match=r"not ready within 5 s"):
        cluster.start_listening("unready", http_server, ready=lambda _process, _port: False, attempts=1, timeout=5)
    assert all(p.stopped for p in cluster.processes)


def test_another_process_dying_meanwhile_fails_at_once_without_a_retry(cluster):
    dead = cluster.start("scheduler", [sys.executable, "-c", "print('scheduler crashed'); raise SystemExit(1)"])
    dead.popen.wait(timeout=30)

    with pytest.raises(ClusterError, match=r"scheduler \(pid \d+\) exited with 1:\nscheduler crashed"):
        cluster.start_listening("web", http_server, ready=lambda _process, _port: False, timeout=60)
    assert cluster.retries == []
