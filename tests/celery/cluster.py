"""A local Airflow cluster made of separate processes, for the Celery scale-out test.

:class:`Cluster` runs one-shot CLI commands (``airflow db migrate``) and starts long-running
processes (api-server, scheduler, dag-processor, Celery workers, the sandboxes), each in its own
session so that its whole process tree shares one process group. Leaving the ``with`` block, also
on an error, stops every group it started, by PID: SIGTERM, a grace period, then SIGKILL for
whatever is left (Celery pool children, uvicorn workers, log servers included).

A process that listens on a port the test picks (the api-server, a Celery worker's log server) is
started with :meth:`Cluster.start_listening`: the port was free when :func:`free_port` picked it,
but another process on the machine can take it before the server binds it (uvicorn then logs
"address already in use" and exits with code 3; a Celery worker carries on without its log server).
Such a start is stopped and tried again on a fresh port, a bounded number of times.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

import psutil

log = logging.getLogger(__name__)

#: `python -m airflow` of the interpreter running the tests (the project's .venv).
AIRFLOW = (sys.executable, "-m", "airflow")

#: What a server logs when its port is taken: uvicorn's "[Errno 98] error while attempting to bind on
#: address ('127.0.0.1', 8080): address already in use", Python's "OSError: [Errno 98] Address already in use".
PORT_IN_USE = re.compile(r"address already in use", re.IGNORECASE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Started:
    """One long-running process (the leader of its own process group) and its log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    stream: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stopped(self) -> bool:
        """Stopped by :meth:`Cluster.stop` (its log stream is closed then)."""
        return self.stream.closed

    def listening_ports(self) -> set[int]:
        """The TCP ports this process or one of its descendants listens on."""
        try:
            leader = psutil.Process(self.pid)
            tree = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return set()
        ports = set()
        for process in tree:
            try:
                connections = process.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile
                continue
            ports.update(c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN)
        return ports

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text.splitlines()[-lines:])


class ClusterError(RuntimeError):
    """A command failed, or a process exited or did not become ready in time."""


class Cluster:
    """Processes sharing one environment; stops every process group it started on exit."""

    def __init__(self, logs: Path, env: Mapping[str, str]):
        self.logs = logs
        self.env = dict(env)
        self.processes: list[Started] = []
        #: One line for each start that failed and was tried again (see start_listening).
        self.retries: list[str] = []
        logs.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ commands and processes

    def run(self, *args: str, timeout: float = 180) -> str:
        """Run ``airflow <args>`` to completion; its output, or ClusterError with the output."""
        popen = subprocess.Popen([*AIRFLOW, *args], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            output, _ = popen.communicate()
            raise ClusterError(f"airflow {' '.join(args)} did not finish in {timeout} s:\n{output}") from None
        except BaseException:  # interrupted (pytest-timeout, Ctrl-C): leave nothing behind
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        if popen.returncode != 0:
            raise ClusterError(f"airflow {' '.join(args)} exited {popen.returncode}:\n{output}")
        return output

    def start(self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> Started:
        """Start ``command`` in a new session, stdout and stderr to ``<logs>/<name>.log``."""
        log = self.logs / f"{name}.log"
        stream = log.open("wb")
        popen = subprocess.Popen(list(command), env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
                                 stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
        started = Started(name, popen, log, stream)
        self.processes.append(started)
        return started

    def start_airflow(self, *args: str, name: str | None = None, env: Mapping[str, str] | None = None) -> Started:
        """Start ``airflow <args>``; named after its first argument unless ``name`` is given."""
        return self.start(name or args[0], [*AIRFLOW, *args], env)

    def start_listening(self, name: str, command: Callable[[int], Sequence[str]], *,
                        env: Callable[[int], Mapping[str, str]] | None = None,
                        ready: Callable[[Started, int], bool] | None = None,
                        attempts: int = 3, timeout: float = 180,
                        choose_port: Callable[[], int] = free_port) -> tuple[Started, int]:
        """Start a process that listens on a port ``choose_port()`` picks; the process and its port.

        ``command(port)`` is started with ``env(port)`` added to the cluster's environment. It is up once
        its process tree listens on the port and ``ready(process, port)``, if given, is true. An attempt
        that exits, logs "address already in use" or is not up within ``timeout`` seconds is stopped and
        logged, with the tail of its log, and the start tried again on a fresh port: ``attempts`` times
        in all, then ClusterError with every attempt's reason and log tail. Another started process
        exiting meanwhile raises ClusterError at once (see check_running): no reason to retry this one.
        """
        failures = []
        for attempt in range(1, attempts + 1):
            port = choose_port()
            process = self.start(name if attempt == 1 else f"{name}-attempt{attempt}", command(port),
                                 env(port) if env else None)
            problem = self._await_listening(process, port, ready, timeout)
            if problem is None:
                return process, port
            self.stop([process], grace=10)
            failures.append(f"{name}, attempt {attempt} of {attempts}, port {port}: {problem}; "
                            f"the tail of {process.log}:\n{process.tail()}")
            if attempt < attempts:
                self.retries.append(f"{name} on port {port}: {problem}")
                log.warning("%s; starting it again on a fresh port", failures[-1])
        raise ClusterError(f"{name} did not start in {attempts} attempts:\n" + "\n\n".join(failures))

    def _await_listening(self, process: Started, port: int, ready: Callable[[Started, int], bool] | None,
                         timeout: float) -> str | None:
        """None once ``process`` listens on ``port`` and is ready, else what went wrong."""
        deadline = time.monotonic() + timeout
        while True:
            if PORT_IN_USE.search(process.log.read_text(errors="replace")):
                return "the port was already in use"
            code = process.popen.poll()
            if code is not None:
                return f"exited with code {code} during start-up"
            self.check_running(ignore=process)
            listening = port in process.listening_ports()
            if listening and (ready is None or ready(process, port)):
                return None
            if time.monotonic() >= deadline:
                return (f"not ready within {timeout} s" if listening else
                        f"not listening on the port within {timeout} s")
            time.sleep(0.5)

    def check_running(self, ignore: Started | None = None) -> None:
        """Raise ClusterError if a started process (not stopped on purpose, not ``ignore``) has exited."""
        for process in self.processes:
            if process.stopped or process is ignore:
                continue
            code = process.popen.poll()
            if code is not None:
                raise ClusterError(f"{process.name} (pid {process.pid}) exited with {code}:\n{process.tail()}")

    def wait_for_log(self, process: Started, pattern: str, timeout: float) -> str:
        """Wait until a line of the process's log matches the regex ``pattern``; that line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in process.log.read_text(errors="replace").splitlines():
                if regex.search(line):
                    return line
            self.check_running()
            time.sleep(0.5)
        raise ClusterError(f"{process.name}: no line matching {pattern!r} in its log after {timeout} s:\n"
                           f"{process.tail()}")

    # ------------------------------------------------------------------ teardown

    def stop(self, processes: Sequence[Started] | None = None, grace: float = 20) -> None:
        """SIGTERM the process groups (all started), wait up to ``grace`` seconds, SIGKILL what is left."""
        running = [p for p in (self.processes if processes is None else processes) if not p.stopped]
        groups = [p for p in running if _signal_group(p.pid, signal.SIGTERM)]
        deadline = time.monotonic() + grace
        for process in groups:
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while children it spawned (same group) still live.
        while groups and time.monotonic() < deadline:
            groups = [p for p in groups if _signal_group(p.pid, 0)]
            if groups:
                time.sleep(0.2)
        for process in groups:
            _signal_group(process.pid, signal.SIGKILL)
        for process in running:
            try:
                process.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
                pass
            process.stream.close()

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(f"----- {p.name} (pid {p.pid}, {p.log}) -----\n{p.tail(lines)}" for p in self.processes)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - only zombies left in the group
        return False
    return True
