"""What every sandbox shares (``usage_billing.sandbox.server``), exercised through the Orb sandbox: injected
and random faults, latency, the state file, the control endpoints, JSON parsing."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.unit.sandbox.conftest import (
    KABLE_CREATE,
    ORB_AUTH,
    ORB_ERRORS,
    ORB_KEY,
    ingest,
    kable_event,
    kable_post,
    orb_event,
    wait_until,
)
from usage_billing.sandbox import Fault, KableSandbox, OrbSandbox, ServerOptions
from usage_billing.sandbox.server import BadBody, parse_json

pytestmark = pytest.mark.timeout(60)


# ============================================================================ faults


@pytest.mark.parametrize(
    ("kind", "kwargs", "status", "error_type", "headers"),
    [
        (Fault.TOO_MANY_REQUESTS, {"retry_after": 1.5}, 429, "#429-too-many-requests", {"Retry-After": "1.5"}),
        (Fault.TOO_MANY_REQUESTS, {"retry_after": 2}, 429, "#429-too-many-requests", {"Retry-After": "2"}),
        (Fault.TOO_MANY_REQUESTS, {}, 429, "#429-too-many-requests", {"Retry-After": None}),
        (Fault.SERVER_ERROR, {}, 500, "#500-internal-server-error", {}),
        (Fault.SERVER_ERROR, {"status": 502}, 502, "#500-internal-server-error", {}),
        (Fault.SERVER_ERROR, {"status": 503}, 503, "#500-internal-server-error", {}),
        (Fault.BAD_REQUEST, {}, 400, "#400-request-validation-errors", {}),
    ],
    ids=[
        "429_retry_after_fraction",
        "429_retry_after_int",
        "429_no_retry_after",
        "500",
        "502",
        "503",
        "bad_request_no_attribution",
    ],
)
def test_orb_http_error_faults(
    orb: OrbSandbox,
    kind: Fault,
    kwargs: dict[str, Any],
    status: int,
    error_type: str,
    headers: dict[str, str | None],
) -> None:
    orb.inject(kind, times=1, **kwargs)
    resp = ingest(orb, [orb_event("k")])
    assert resp.status_code == status
    body = resp.json()
    assert body["type"] == f"{ORB_ERRORS}{error_type}"
    assert body["status"] == status
    for name, value in headers.items():
        assert resp.headers.get(name) == value
    if kind is Fault.BAD_REQUEST:
        assert body["validation_errors"] == []
    assert orb.accepted() == []
    assert orb.requests[-1].fault == kind.value and orb.requests[-1].status == status
    # The fault was used up: the retry goes through.
    assert ingest(orb, [orb_event("k")]).status_code == 200
    assert orb.accepted_keys() == {"k"}


def test_orb_faults_apply_in_fifo_order_with_times(orb: OrbSandbox) -> None:
    orb.inject(Fault.TOO_MANY_REQUESTS, times=2, retry_after=1)
    orb.inject(Fault.SERVER_ERROR, status=503)
    assert orb.pending_faults == 3
    statuses = [ingest(orb, [orb_event("k")]).status_code for _ in range(4)]
    assert statuses == [429, 429, 503, 200]
    assert [r.fault for r in orb.requests] == ["too_many_requests", "too_many_requests", "server_error", None]


def test_orb_slow_fault_times_client_out_then_processes(orb: OrbSandbox) -> None:
    orb.inject(Fault.SLOW, delay=1.0)
    with pytest.raises(requests.Timeout):
        ingest(orb, [orb_event("slow")], timeout=0.5)
    # The server still processes the request after the delay, as a slow real server would.
    assert wait_until(lambda: orb.accepted_keys() == {"slow"})
    assert orb.requests[-1].fault == "slow" and orb.requests[-1].status == 200


class RecordedPauses:
    """A sandbox's ``pause`` that records each delay instead of waiting it out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float, stopping: threading.Event) -> bool:
        self.delays.append(seconds)
        return not stopping.is_set()


def test_orb_slow_fault_answers_patient_client() -> None:
    pauses = RecordedPauses()
    with OrbSandbox(api_key=ORB_KEY, server=ServerOptions(pause=pauses)) as orb:
        orb.inject(Fault.SLOW, delay=0.2)
        assert ingest(orb, [orb_event("k")]).status_code == 200
        assert orb.accepted_keys() == {"k"}
    assert pauses.delays == [0.2], "the SLOW delay, and no latency (none configured)"


def test_stop_interrupts_slow_request(orb: OrbSandbox) -> None:
    orb.inject(Fault.SLOW, delay=30)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            ingest(orb, [orb_event("k")], timeout=10)
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    assert wait_until(lambda: orb.pending_faults == 0)
    orb.stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "stop() ended the slow request instead of waiting 30 s for it"
    assert len(errors) == 1 and isinstance(errors[0], requests.ConnectionError)
    assert orb.accepted() == []


def test_fault_kind_accepts_value_or_name(orb: OrbSandbox) -> None:
    orb.inject("server_error")
    orb.inject("TOO_MANY_REQUESTS")
    assert [ingest(orb, [orb_event("k")]).status_code for _ in range(2)] == [500, 429]


def test_orb_reset_fault_raises_connection_error_and_accepts_nothing(orb: OrbSandbox) -> None:
    orb.inject(Fault.RESET)
    with pytest.raises(requests.ConnectionError):
        ingest(orb, [orb_event("k")])
    assert orb.accepted() == []
    record = orb.requests[-1]
    assert (record.fault, record.status, record.n_events) == ("reset", None, 1)
    assert ingest(orb, [orb_event("k")]).status_code == 200
    assert orb.accepted_keys() == {"k"}


def test_orb_reset_fault_on_reused_keep_alive_connection(orb: OrbSandbox) -> None:
    with requests.Session() as session:
        assert ingest(orb, [orb_event("warm")], session=session).status_code == 200
        orb.inject(Fault.RESET)
        with pytest.raises(requests.ConnectionError):
            ingest(orb, [orb_event("k")], session=session)
        assert orb.accepted_keys() == {"warm"}
        # The session recovers on a new connection.
        assert ingest(orb, [orb_event("k")], session=session).status_code == 200
    assert orb.accepted_keys() == {"warm", "k"}


def test_orb_lost_response_raises_connection_error_but_accepts(orb: OrbSandbox) -> None:
    orb.inject(Fault.LOST_RESPONSE)
    events = [orb_event("a"), orb_event("b")]
    with pytest.raises(requests.ConnectionError):
        ingest(orb, events)
    assert orb.accepted_keys() == {"a", "b"}
    record = orb.requests[-1]
    assert (record.fault, record.status, record.n_events) == ("lost_response", None, 2)
    # The client's retry is answered normally and de-duplicated.
    assert ingest(orb, events).status_code == 200
    assert orb.duplicates == 2 and len(orb.accepted()) == 2


def test_orb_faults_never_hit_control_or_backfill_endpoints(orb: OrbSandbox) -> None:
    orb.inject(Fault.SERVER_ERROR, times=1)
    assert requests.get(f"{orb.url}/_sandbox/health", timeout=5).status_code == 200
    assert requests.get(f"{orb.url}/v1/events/backfills", headers=ORB_AUTH, timeout=5).status_code == 200
    assert orb.pending_faults == 1
    assert ingest(orb, [orb_event("k")]).status_code == 500


def test_clear_faults_and_reset(orb: OrbSandbox) -> None:
    orb.inject(Fault.SERVER_ERROR, times=5)
    orb.set_random_faults(rate=1.0, kinds=[Fault.TOO_MANY_REQUESTS])
    orb.clear_faults()
    assert ingest(orb, [orb_event("k")]).status_code == 200
    orb.inject(Fault.SERVER_ERROR)
    orb.reset()
    assert orb.accepted() == [] and orb.requests == [] and orb.duplicates == 0
    assert ingest(orb, [orb_event("k")]).status_code == 200


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("nonsense", {}),
        (Fault.SERVER_ERROR, {"status": 404}),
        (Fault.TOO_MANY_REQUESTS, {"status": 500}),
        (Fault.SLOW, {"delay": -1}),
        (Fault.RESET, {"times": 0}),
    ],
    ids=["unknown_kind", "non_5xx_status", "status_on_429", "negative_delay", "zero_times"],
)
def test_inject_rejects_bad_arguments(orb: OrbSandbox, kind: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        orb.inject(kind, **kwargs)


def _status_sequence(orb: OrbSandbox, n: int) -> list[str]:
    out = []
    with requests.Session() as session:
        for i in range(n):
            try:
                out.append(str(ingest(orb, [orb_event(f"k{i}")], session=session).status_code))
            except requests.ConnectionError:
                out.append("conn")
    return out


def test_random_faults_are_reproducible_with_seed() -> None:
    kinds = [Fault.TOO_MANY_REQUESTS, Fault.SERVER_ERROR, Fault.RESET, Fault.LOST_RESPONSE]
    runs = []
    for seed in (7, 7, 8):
        with OrbSandbox(api_key=ORB_KEY) as orb:
            orb.set_random_faults(rate=0.5, kinds=kinds, seed=seed)
            runs.append(_status_sequence(orb, 30))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert "200" in runs[0] and len(set(runs[0])) >= 3


def test_random_faults_rate_zero_turns_off(orb: OrbSandbox) -> None:
    orb.set_random_faults(rate=1.0, kinds=[Fault.SERVER_ERROR], seed=1)
    assert _status_sequence(orb, 3)[0] in {"500", "502", "503"}
    orb.set_random_faults(rate=0)
    assert _status_sequence(orb, 5) == ["200"] * 5


def test_latency_is_applied_to_each_request_concurrently() -> None:
    """Each request waits out the latency in its own thread, not holding the sandbox's lock: the
    three requests' pauses meet at a barrier, which a serialised wait would never fill."""
    n = 3
    meeting = threading.Barrier(n, timeout=10)
    delays: list[float] = []
    all_waiting_at_once: list[bool] = []

    def pause(seconds: float, stopping: threading.Event) -> bool:
        delays.append(seconds)
        try:
            meeting.wait()
            all_waiting_at_once.append(True)
        except threading.BrokenBarrierError:
            all_waiting_at_once.append(False)
        return not stopping.is_set()

    with OrbSandbox(api_key=ORB_KEY, server=ServerOptions(latency=0.3, pause=pause)) as orb:
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda i=i: statuses.append(ingest(orb, [orb_event(f"k{i}")],
                                                                             timeout=30).status_code))
                   for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == [200] * n
    assert delays == [0.3] * n
    assert all_waiting_at_once == [True] * n


def test_a_negative_latency_is_refused() -> None:
    with pytest.raises(ValueError, match="latency must be >= 0"):
        ServerOptions(latency=-1)


# ============================================================================ persistence


def test_state_file_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "orb.jsonl"
    events = [orb_event(f"k{i}") for i in range(3)]
    with OrbSandbox(api_key=ORB_KEY, server=ServerOptions(state_file=state)) as orb:
        assert ingest(orb, events).status_code == 200
    assert len(state.read_text().splitlines()) == 3
    with OrbSandbox(api_key=ORB_KEY, server=ServerOptions(state_file=state)) as orb:
        assert orb.accepted() == events
        assert ingest(orb, events).status_code == 200
        assert orb.duplicates == 3
        assert orb.accepted() == events
    assert len(state.read_text().splitlines()) == 3


def test_state_file_tolerates_torn_last_line(tmp_path: Path) -> None:
    state = tmp_path / "kable.jsonl"
    state.write_text(json.dumps(kable_event("t1")) + "\n" + '{"clientId": "c", "timest')
    with KableSandbox(server=ServerOptions(state_file=state)) as kable:
        assert kable.accepted_keys() == {"t1"}


def test_reset_truncates_state_file(tmp_path: Path) -> None:
    state = tmp_path / "orb.jsonl"
    with OrbSandbox(api_key=ORB_KEY, server=ServerOptions(state_file=state)) as orb:
        ingest(orb, [orb_event("k")])
        orb.reset()
    with OrbSandbox(api_key=ORB_KEY, server=ServerOptions(state_file=state)) as orb:
        assert orb.accepted() == []


def test_restart_same_instance_keeps_state(tmp_path: Path) -> None:
    orb = OrbSandbox(api_key=ORB_KEY, server=ServerOptions(state_file=tmp_path / "orb.jsonl"))
    orb.start()
    ingest(orb, [orb_event("k")])
    orb.stop()
    orb.stop()  # idempotent
    orb.start()
    try:
        assert orb.accepted_keys() == {"k"}
        assert ingest(orb, [orb_event("k")]).status_code == 200
        assert orb.duplicates == 1
    finally:
        orb.stop()


# ============================================================================ control endpoints


def test_control_endpoints(orb: OrbSandbox) -> None:
    base = f"{orb.url}/_sandbox"
    assert requests.get(f"{base}/health", timeout=5).json()["ok"] is True

    resp = requests.post(
        f"{base}/faults", json={"kind": "too_many_requests", "times": 2, "retry_after": 1.5}, timeout=5
    )
    assert resp.status_code == 200
    first = ingest(orb, [orb_event("k")])
    assert first.status_code == 429 and first.headers["Retry-After"] == "1.5"
    assert requests.delete(f"{base}/faults", timeout=5).status_code == 200
    assert ingest(orb, [orb_event("k")]).status_code == 200

    requests.post(f"{base}/faults", json={"kind": "server_error", "status": 503}, timeout=5)
    assert ingest(orb, [orb_event("k2")]).status_code == 503
    requests.post(f"{base}/faults", json={"kind": "slow", "delay": 0.1}, timeout=5)
    assert ingest(orb, [orb_event("k2")]).status_code == 200

    events = requests.get(f"{base}/events", timeout=5).json()
    assert [e["idempotency_key"] for e in events["accepted"]] == ["k", "k2"]
    assert events["duplicates"] == 0 and events["requests"] == 4
    assert events["backfills"] == []

    assert requests.post(f"{base}/reset", timeout=5).status_code == 200
    assert requests.get(f"{base}/events", timeout=5).json() == {
        "accepted": [],
        "duplicates": 0,
        "requests": 0,
        "backfills": [],
    }


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "meteor_strike"},
        {"times": 2},
        ["too_many_requests"],
        {"kind": "server_error", "status": 418},
        {"kind": "reset", "colour": "red"},
    ],
    ids=["unknown_kind", "missing_kind", "not_an_object", "bad_status", "unknown_field"],
)
def test_control_fault_endpoint_validates(kable: KableSandbox, body: Any) -> None:
    resp = requests.post(f"{kable.url}/_sandbox/faults", json=body, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["ok"] is False
    assert kable.pending_faults == 0


def test_control_random_faults_endpoint(kable: KableSandbox) -> None:
    resp = requests.post(
        f"{kable.url}/_sandbox/random_faults", json={"rate": 1.0, "kinds": ["too_many_requests"], "seed": 3}, timeout=5
    )
    assert resp.status_code == 200
    assert kable_post(kable, [kable_event("t")]).status_code == 429
    requests.delete(f"{kable.url}/_sandbox/faults", timeout=5)
    assert kable_post(kable, [kable_event("t")]).status_code == 200


def test_control_requests_endpoint_lists_log(kable: KableSandbox) -> None:
    kable_post(kable, [kable_event("t")])
    [record] = requests.get(f"{kable.url}/_sandbox/requests", timeout=5).json()["requests"]
    assert record["path"] == KABLE_CREATE and record["status"] == 200 and record["n_events"] == 1


# ============================================================================ JSON parsing (a hot path)


@pytest.mark.parametrize(
    "raw",
    [
        b"[1, 1.0, -0, -0.0, 1e5, 0.1, 18446744073709551616]",
        b'{"a": 1, "a": 2}',
        b' {"s": "\\u00e9\\n", "t": "\xc3\xa9"} ',
    ],
    ids=["numbers", "repeated_name", "escapes"],
)
def test_parse_json_equals_python_json(raw: bytes) -> None:
    parsed = parse_json(raw)
    expected = json.loads(raw)
    assert parsed == expected and repr(parsed) == repr(expected)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[NaN]", "NaN is not valid JSON"),
        (b"[1,]", "Expecting value: line 1 column 4 (char 3)"),
        (b"\xef\xbb\xbf[1]", "Unexpected UTF-8 BOM"),
    ],
    ids=["nan", "trailing_comma", "bom"],
)
def test_parse_json_errors_are_python_json_errors(raw: bytes, message: str) -> None:
    with pytest.raises(BadBody, match=re.escape(f"request body is not valid JSON: {message}")):
        parse_json(raw)
