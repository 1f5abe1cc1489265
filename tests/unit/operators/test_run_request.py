"""A run's request: mode from the DAG, window or period checked, and a first log line saying all of it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from billing_airflow.operators.run_request import (
    DELIVER,
    REPLACE,
    REPLAY_REJECTED,
    last_complete_interval,
    run_request,
)
from tests.integration.conftest import config
from usage_billing.destinations import DESTINATIONS, Capabilities
from usage_billing.settings import parse_settings

SETTINGS = parse_settings(config("src", "ledger"))
T = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def context(dag_id="segment_to_orb", params=None, declared=(), interval=None, run_after=T):
    ctx = {"dag": SimpleNamespace(dag_id=dag_id, params=dict.fromkeys(declared)), "params": dict(params or {}),
           "dag_run": SimpleNamespace(run_after=run_after)}
    if interval:
        ctx["data_interval_start"], ctx["data_interval_end"] = interval
    return ctx


@pytest.mark.parametrize(("run_after", "expected"), [
    (datetime(2026, 11, 23, 10, 37, tzinfo=UTC), (T - timedelta(hours=1), T)),
    (T, (T - timedelta(hours=1), T)),
    (datetime(2026, 11, 23, 10, 0, 0, 1, tzinfo=UTC), (T - timedelta(hours=1), T)),
], ids=["inside_an_hour", "exactly_on_the_hour", "just_after_the_hour"])
def test_last_complete_interval_of_the_schedule(run_after, expected):
    assert last_complete_interval("0 * * * *", run_after) == expected


def test_a_run_with_a_data_interval_delivers_it():
    request = run_request(context(interval=(T, T + timedelta(hours=1))), SETTINGS, DELIVER, "orb")
    assert (request.window.start, request.window.end) == (T, T + timedelta(hours=1))
    assert request.window.lookback == timedelta(hours=6)
    assert "mode=deliver (fixed by the DAG segment_to_orb)" in request.echo and "data interval" in request.echo


def test_a_run_without_a_logical_date_delivers_the_last_complete_hour_and_says_so():
    request = run_request(context(run_after=T + timedelta(minutes=42)), SETTINGS, DELIVER, "orb")
    assert (request.window.start, request.window.end) == (T - timedelta(hours=1), T)
    assert "without a logical date" in request.echo and "Backfill" in request.echo


def test_a_mode_in_the_run_conf_of_the_hourly_dag_fails_at_once_naming_the_replay_dag():
    with pytest.raises(AirflowFailException, match="segment_to_orb_replay_rejected") as error:
        run_request(context(params={"mode": "replay_rejected"}, interval=(T, T + timedelta(hours=1))),
                    SETTINGS, DELIVER, "orb")
    assert "takes no parameter 'mode'" in str(error.value)


@pytest.mark.parametrize(("reason", "expected"), [(None, None), ("", None), ("  customer ", "customer")],
                         ids=["null", "empty", "text_trimmed"])
def test_replay_takes_an_optional_reason_filter_and_echoes_it(reason, expected):
    ctx = context("segment_to_orb_replay_rejected", {"reason_contains": reason}, ["reason_contains"])
    request = run_request(ctx, SETTINGS, REPLAY_REJECTED, "orb")
    assert request.reason_contains == expected and request.window is None
    assert "mode=replay_rejected" in request.echo
    assert ("every rejection" in request.echo) == (expected is None)


def test_replace_echoes_its_period():
    ctx = context("segment_to_orb_replace", {"period_start": "2026-11-23T08:00:00+00:00",
                                             "period_end": "2026-11-23T10:00:00Z"}, ["period_start", "period_end"])
    request = run_request(ctx, SETTINGS, REPLACE, "orb")
    assert (request.window.start, request.window.end) == (T - timedelta(hours=2), T)
    assert "mode=replace" in request.echo and "2026-11-23T08:00:00+00:00" in request.echo


@pytest.mark.parametrize(("start", "end", "message"), [
    (None, "2026-11-23T10:00:00Z", "period_start is required"),
    ("yesterday", "2026-11-23T10:00:00Z", "not a date-time"),
    ("2026-11-23T10:00:00Z", "2026-11-23T09:00:00Z", "must be before"),
    ("2026-09-01T00:00:00Z", "2026-11-01T00:00:00Z", "31 days"),
    ("2999-01-01T00:00:00Z", "2999-01-01T01:00:00Z", "future"),
], ids=["missing", "not_a_date", "reversed", "longer_than_an_orb_backfill", "in_the_future"])
def test_a_bad_replace_period_fails_at_once(start, end, message):
    ctx = context("segment_to_orb_replace", {"period_start": start, "period_end": end},
                  ["period_start", "period_end"])
    with pytest.raises(AirflowFailException, match=message):
        run_request(ctx, SETTINGS, REPLACE, "orb")


def test_naive_period_bounds_are_utc():
    ctx = context("segment_to_orb_replace", {"period_start": "2026-11-23T08:00", "period_end": "2026-11-23T09:00"},
                  ["period_start", "period_end"])
    assert run_request(ctx, SETTINGS, REPLACE, "orb").window.start == T - timedelta(hours=2)


def test_replace_follows_the_declared_backfills_not_the_destination_name(monkeypatch):
    period = {"period_start": "2026-11-23T08:00:00+00:00", "period_end": "2026-11-23T09:00:00+00:00"}
    with pytest.raises(AirflowFailException, match="kable declares none"):
        run_request(context("segment_to_kable_replace", period, list(period)), SETTINGS, REPLACE, "kable")
    monkeypatch.setitem(DESTINATIONS, "kable", dataclasses.replace(DESTINATIONS["kable"],
                                                                   capabilities=Capabilities(backfills=True)))
    request = run_request(context("segment_to_kable_replace", period, list(period)), SETTINGS, REPLACE, "kable")
    assert request.window.start == datetime(2026, 11, 23, 8, tzinfo=UTC)


@pytest.mark.parametrize("backfills", [True, False], ids=["declared", "not_declared"])
def test_the_mode_hint_names_a_replace_dag_only_when_backfills_are_declared(monkeypatch, backfills):
    monkeypatch.setitem(DESTINATIONS, "kable", dataclasses.replace(DESTINATIONS["kable"],
                                                                   capabilities=Capabilities(backfills=backfills)))
    with pytest.raises(AirflowFailException) as error:
        run_request(context("segment_to_kable", {"mode": "replace"}), SETTINGS, DELIVER, "kable")
    assert "segment_to_kable_replay_rejected" in str(error.value)
    assert ("segment_to_kable_replace" in str(error.value)) == backfills
