"""What one DAG run asks for: its mode, its window or period, its filter, checked before anything runs.

Each DAG has exactly one mode, given to its operators by the DAG factory; a run's parameters can
narrow what it does but never change the mode. That is deliberate: the Airflow UI's backfill form
posts ``dag_run_conf: null`` unless "Override parameters on existing runs" is ticked, so a mode that
came from the run's parameters silently fell back to a plain delivery. The hourly DAGs take no
parameter at all (their forms need nothing typed); re-billing a period and replaying rejections
are DAGs of their own.

Every problem found here fails the task at once, without retries (:class:`AirflowFailException`):
retrying a run whose request is wrong only holds the DAG's single active-run slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException
from croniter import croniter

from usage_billing.destinations import DESTINATIONS
from usage_billing.settings import Settings
from usage_billing.sources import Window

DELIVER, REPLAY_REJECTED, REPLACE = "deliver", "replay_rejected", "replace"
MODES = (DELIVER, REPLAY_REJECTED, REPLACE)

#: Orb backfills span at most 31 days (one replacing backfill per replace run).
MAX_REPLACE_PERIOD = timedelta(days=31)


def dag_id_for(destination: str, mode: str) -> str:
    """``segment_to_orb``, ``segment_to_orb_replace``, ``segment_to_kable_replay_rejected``..."""
    return f"segment_to_{destination}" if mode == DELIVER else f"segment_to_{destination}_{mode}"


@dataclass(frozen=True)
class RunRequest:
    """A validated run: the mode (from the DAG), the window or period, and the rejection filter."""

    mode: str
    window: Window | None
    reason_contains: str | None
    #: One line saying all of the above, logged first by every task of the run.
    echo: str


def last_complete_interval(schedule: str, run_after: datetime) -> tuple[datetime, datetime]:
    """The last whole interval of the cron ``schedule`` (UTC) that ended at or before ``run_after``.

    What Airflow itself gives a manual run of a data-interval timetable that has a logical date.
    """
    run_after = run_after.astimezone(UTC)
    # +1 µs: a run_after exactly on a tick ends the interval at that tick, not one earlier.
    end = croniter(schedule, run_after + timedelta(microseconds=1)).get_prev(datetime)
    start = croniter(schedule, end).get_prev(datetime)
    return start.astimezone(UTC), end.astimezone(UTC)


def _utc(value: Any) -> datetime:
    return datetime.fromtimestamp(value.timestamp(), UTC)


def _dag_id(context: Any) -> str:
    dag = context.get("dag")
    return getattr(dag, "dag_id", None) or "this DAG"


def _unexpected_params(context: Any) -> list[str]:
    """Run conf keys that are not params of the DAG (``dag_run.conf`` keys land in ``params`` too)."""
    params = context.get("params") or {}
    declared = set(getattr(context.get("dag"), "params", None) or {})
    return sorted(set(params) - declared)


def delivery_window(context: Any, settings: Settings) -> tuple[Window, str]:
    """The hourly run's window and where it came from.

    A run with a logical date (scheduled, backfill, or triggered with one) has a data interval. A run
    triggered without one (``airflow dags trigger`` without ``--logical-date``, or the UI's trigger
    form with the date left empty) has none; it delivers the last complete interval before the run
    was triggered, which is what the hourly schedule would have delivered then.
    """
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    lookback = settings.source.lookback
    if start is not None and end is not None:
        if start >= end:
            raise AirflowFailException(f"the run has an empty data interval ({start} .. {end}); schedule the DAG "
                                       f"with an interval timetable, not a plain cron trigger")
        return Window(_utc(start), _utc(end), lookback), "the run's data interval"
    dag_run = context.get("dag_run")
    run_after = getattr(dag_run, "run_after", None)
    if run_after is None:
        raise AirflowFailException(f"the run has neither a data interval nor a run_after time; trigger "
                                   f"{_dag_id(context)} with a logical date, or backfill the hours to deliver")
    start, end = last_complete_interval(settings.airflow.schedule, _utc(run_after))
    return Window(start, end, lookback), (
        f"the last complete interval of airflow.schedule before {_utc(run_after):%Y-%m-%d %H:%M:%S} UTC: the run "
        f"was triggered without a logical date (to deliver other hours, trigger with a logical date or use "
        f"Trigger -> Backfill)")


def parse_period_bound(name: str, value: Any) -> datetime:
    """A ``period_start``/``period_end`` param as an aware UTC datetime (naive values are UTC)."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace("Z", "+00:00")
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise AirflowFailException(f"param {name}: {value!r} is not a date-time such as "
                                       f"2026-11-01T00:00:00+00:00") from None
    else:
        raise AirflowFailException(f"param {name} is required: the start/end of the period to re-bill, e.g. "
                                   f"2026-11-01T00:00:00+00:00")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def replace_period(context: Any, now: datetime | None = None) -> Window:
    """The ``[period_start, period_end)`` a replace run re-bills, validated."""
    params = context.get("params") or {}
    start = parse_period_bound("period_start", params.get("period_start"))
    end = parse_period_bound("period_end", params.get("period_end"))
    now = now or datetime.now(UTC)
    if start >= end:
        raise AirflowFailException(f"params: period_start ({start.isoformat()}) must be before period_end "
                                   f"({end.isoformat()})")
    if end - start > MAX_REPLACE_PERIOD:
        raise AirflowFailException(f"params: the period spans {end - start}; an Orb backfill spans at most 31 days, "
                                   f"so re-bill a longer time in several runs")
    if end > now:
        raise AirflowFailException(f"params: period_end ({end.isoformat()}) is in the future; re-bill only a period "
                                   f"whose events are all loaded")
    return Window(start, end)


def run_request(context: Any, settings: Settings, mode: str, destination: str) -> RunRequest:
    """Validate the run against its DAG's mode; raises AirflowFailException (no retries) on a bad request."""
    if mode not in MODES:
        raise AirflowFailException(f"mode {mode!r} is not one of {', '.join(MODES)}")
    backfills = DESTINATIONS[destination].capabilities.backfills
    unexpected = _unexpected_params(context)
    if unexpected:
        hint = ""
        if "mode" in unexpected:
            hint = (f"; the mode is the DAG's, not a parameter: trigger {dag_id_for(destination, REPLAY_REJECTED)} "
                    f"to replay rejections" + (f" or {dag_id_for(destination, REPLACE)} to re-bill a period"
                                               if backfills else ""))
        raise AirflowFailException(f"{_dag_id(context)} takes no parameter {', '.join(map(repr, unexpected))}{hint}")
    params = context.get("params") or {}
    head = f"run request: {destination}, mode={mode} (fixed by the DAG {_dag_id(context)})"
    if mode == DELIVER:
        window, source = delivery_window(context, settings)
        return RunRequest(mode, window, None, f"{head}, window {window}, from {source}")
    if mode == REPLACE:
        if not backfills:
            raise AirflowFailException(f"mode=replace needs backfills to replace a period; {destination} declares none")
        window = replace_period(context)
        return RunRequest(mode, window, None,
                          f"{head}, period [{window.start.isoformat()}, {window.end.isoformat()}) by event timestamp "
                          f"(params period_start={params.get('period_start')!r}, "
                          f"period_end={params.get('period_end')!r})")
    reason = params.get("reason_contains")
    if reason is not None and not isinstance(reason, str):
        raise AirflowFailException(f"param reason_contains: {reason!r} is not text")
    reason = (reason or "").strip() or None
    what = f"only rejections whose reason contains {reason!r}" if reason else "every rejection"
    return RunRequest(mode, None, reason, f"{head}, {what} (param reason_contains={params.get('reason_contains')!r})")
