"""Run the Orb and Kable sandboxes as a separate process.

Usage::

    python -m usage_billing.sandbox --orb-port 0 --kable-port 0 \\
        --orb-api-key K --kable-client-id C --kable-api-key S --latency 0.05 --state-dir DIR

Once both are listening, ONE JSON line is printed to stdout and flushed::

    {"orb_url": "http://127.0.0.1:41234", "kable_url": "http://127.0.0.1:41235", "pid": 4242}

A port of -1 skips that sandbox (its URL is printed as null). The process runs until SIGTERM or
SIGINT, then shuts both servers down and exits 0. Control the sandboxes through their
``/_sandbox/*`` endpoints (events, health, faults, reset).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

from usage_billing.sandbox.kable import KableSandbox
from usage_billing.sandbox.orb import OrbSandbox
from usage_billing.sandbox.server import SandboxServer, ServerOptions


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m usage_billing.sandbox",
        description="Run local Orb and Kable ingestion sandboxes on 127.0.0.1.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 inside a container; the control endpoints have no auth)")
    parser.add_argument("--orb-port", type=int, default=0, help="0 = any free port, -1 = do not run Orb")
    parser.add_argument("--kable-port", type=int, default=0, help="0 = any free port, -1 = do not run Kable")
    parser.add_argument("--orb-api-key", default="orb-test-key")
    parser.add_argument("--kable-client-id", default="kci_test")
    parser.add_argument("--kable-api-key", default="kable-sandbox-key")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each ingest response")
    parser.add_argument("--grace-period-hours", type=float, default=12.0, help="Orb account grace period")
    parser.add_argument(
        "--orb-validation-response",
        choices=("400", "200"),
        default="400",
        help="how Orb answers a batch with invalid events",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="persist accepted events to DIR/orb-events.jsonl and DIR/kable-events.jsonl",
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


def freeze_survivors() -> None:
    """Make the cyclic garbage collector examine each object once, soon after its creation.

    Accepted events live until a reset, and CPython's collections of older generations walk every
    live object again and again: with a few hundred thousand events held that was 40% of the
    ingest CPU. After one full collection now, the survivors of every collection are frozen
    (moved to the permanent generation), so a collection only examines objects made since the
    previous one. Frozen objects are still freed by reference counting when they die; only a
    reference cycle among them would never be collected, and the sandbox makes none (checked
    with all faults, bad bodies and control calls). Process-wide, so done only by this dedicated
    process, never by an in-process sandbox.
    """

    def freeze(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            gc.freeze()

    gc.collect()
    gc.freeze()
    gc.callbacks.append(freeze)


def main(argv: list[str] | None = None) -> int:
    """Start the requested sandboxes, announce their URLs, and serve until signalled."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)

    def state(name: str) -> Path | None:
        return None if args.state_dir is None else args.state_dir / f"{name}-events.jsonl"

    sandboxes: list[SandboxServer] = []
    orb = kable = None
    if args.orb_port >= 0:
        orb = OrbSandbox(
            api_key=args.orb_api_key,
            grace_period=timedelta(hours=args.grace_period_hours),
            validation_response=args.orb_validation_response,
            server=ServerOptions(latency=args.latency, seed=args.seed, state_file=state("orb"), port=args.orb_port),
        )
        sandboxes.append(orb)
    if args.kable_port >= 0:
        kable = KableSandbox(
            client_id=args.kable_client_id,
            api_key=args.kable_api_key,
            server=ServerOptions(latency=args.latency, seed=args.seed, state_file=state("kable"),
                                 port=args.kable_port),
        )
        sandboxes.append(kable)
    for sandbox in sandboxes:
        sandbox.host = args.host
    if not sandboxes:
        print("nothing to run: both --orb-port and --kable-port are -1", file=sys.stderr)
        return 2

    freeze_survivors()
    stop = threading.Event()
    # Handlers only set a flag: shutting the servers down inside a signal handler could deadlock.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for sandbox in sandboxes:
            sandbox.start()
        line = {
            "orb_url": orb.url if orb else None,
            "kable_url": kable.url if kable else None,
            "pid": os.getpid(),
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        for sandbox in sandboxes:
            sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
