"""A local Airflow cluster made of separate processes, for the Celery scale-out test.

:class:`Cluster` runs one-shot CLI commands (``airflow db migrate``) and starts long-running
processes (api-server, scheduler, dag-processor, Celery workers, the sandboxes), each in its own
session so that its whole process tree shares one process group. Leaving the ``with`` block, also
on an error, stops every group it started, by PID: SIGTERM, a grace period, then SIGKILL for
whatever is left (Celery pool children, uvicorn workers, log servers included).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

#: `python -m airflow` of the interpreter running the tests (the project's .venv).
AIRFLOW = (sys.executable, "-m", "airflow")


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

    def check_running(self) -> None:
        """Raise ClusterError if a started process has exited."""
        for process in self.processes:
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

    def stop(self, grace: float = 20) -> None:
        """SIGTERM every process group started, wait up to ``grace`` seconds, SIGKILL what is left."""
        running = [p for p in self.processes if not p.stream.closed]  # not stopped yet
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
