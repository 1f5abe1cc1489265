"""Every workflow a data engineer performs in the Airflow UI, in a real Chromium against a real Airflow.

In order, on one Airflow (see conftest.py), each test building on the state the previous one left:

* the default Backfill from the Trigger -> Backfill form of ``segment_to_orb``, with only the date
  range chosen: every deliverable event reaches the Orb sandbox exactly once and the ledger agrees;
* the same range again from the form ("All Runs"): the sandbox receives nothing;
* a deliver task's log opened in the UI: its label is the event table and its summary block is on
  the page, with the counts the ledger has for that task;
* re-billing a period through ``segment_to_orb_replace``'s trigger form, approved on the run's Required
  Actions page (which shows the dry run's impact), then a replay of rejections through
  ``segment_to_orb_replay_rejected``'s, each checked in the sandbox and the ledger;
* a second replace, rejected on the Required Actions page: nothing reaches the sandbox;
* the Billing view (this project's Airflow plugin), opened from the UI's menu, against the ledger:
  per day and destination (with a day count as the sweep stores it), the busiest customer's row, and
  the customer filter.

No test uses the REST API to act; they read the metadata database only to wait for runs to finish.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta

import pytest
import requests
import sqlalchemy as sa
import yaml

from tests.browser.conftest import DELIVERY_DEADLINE, EVENT_TABLES, HOURS, LOOKBACK, RUN_TIMEOUT, Stack
from usage_billing.ledger import Ledger, RunRef

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

DAG = "segment_to_orb"


# ---------------------------------------------------------------------------------------- UI steps

def open_trigger_form(page, stack: Stack, dag_id: str):
    """The DAG page's Trigger dialog."""
    from playwright.sync_api import expect

    page.goto(f"{stack.url}/dags/{dag_id}", wait_until="networkidle")
    page.get_by_role("button", name="Trigger").first.click()
    # Not by role alone: a date picker's closed popover is a "dialog" too once a date has been picked.
    dialog = page.locator("[role=dialog][data-scope=dialog]")
    expect(dialog).to_be_visible()
    return dialog


def pick_datetime(page, field, when: datetime) -> None:
    """Fill one of the UI's date-time pickers (a popover with a date and a time box, in UTC)."""
    from playwright.sync_api import expect

    field.click()
    popover = page.locator("[data-scope=popover][data-part=content][data-state=open]")
    expect(popover.get_by_text("UTC")).to_be_visible()
    popover.get_by_placeholder("YYYY/MM/DD").fill(f"{when:%Y/%m/%d}")
    popover.get_by_placeholder("HH:mm").fill(f"{when:%H:%M}")
    page.keyboard.press("Escape")
    expect(popover).to_have_count(0)


def backfill_from_the_form(page, stack: Stack, start: datetime, end: datetime, runs: int,
                           reprocess: str | None = None) -> None:
    """Trigger -> Backfill, the date range, optionally a reprocess behaviour, Run Backfill. Nothing else typed."""
    from playwright.sync_api import expect

    dialog = open_trigger_form(page, stack, DAG)
    dialog.get_by_text("Backfill", exact=True).click()
    pickers = dialog.get_by_test_id("datetime-input")
    pick_datetime(page, pickers.nth(0), start)
    pick_datetime(page, pickers.nth(1), end)
    if reprocess:
        dialog.get_by_text(reprocess, exact=True).click()
    expect(dialog.get_by_text(f"{runs} run{'s' if runs > 1 else ''} will be triggered")).to_be_visible()
    unpause = dialog.get_by_role("checkbox", name=re.compile("Unpause"))
    if unpause.count():  # offered while the DAG is paused (new DAGs are), ticked by default
        expect(unpause).to_be_checked()
    run = dialog.get_by_role("button", name="Run Backfill")
    expect(run).to_be_enabled()
    run.click()
    expect(dialog).to_be_hidden()


def trigger_from_the_form(page, stack: Stack, dag_id: str, fill=None) -> None:
    """Trigger -> Single Run, the run parameters filled by ``fill(page, dialog)``, Trigger."""
    from playwright.sync_api import expect

    dialog = open_trigger_form(page, stack, dag_id)
    if fill:
        fill(page, dialog)
    button = dialog.get_by_role("button", name="Trigger", exact=True)
    expect(button).to_be_enabled()
    button.click()
    expect(dialog).to_be_hidden()


def param_field(dialog, label: str):
    return dialog.get_by_role("group").filter(has_text=label).get_by_test_id("datetime-input")


REPLACE = "segment_to_orb_replace"


def trigger_replace(page, stack: Stack, start: datetime, end: datetime) -> str:
    """Trigger the replace DAG for ``[start, end)`` from its form; the new run's id, once it waits for approval."""
    before = len(stack.runs(REPLACE))

    def period(page, dialog):
        pick_datetime(page, param_field(dialog, "Period start"), start)
        pick_datetime(page, param_field(dialog, "Period end"), end)

    trigger_from_the_form(page, stack, REPLACE, period)
    return wait_for_approval_request(stack, REPLACE, before)


def wait_for_approval_request(stack: Stack, dag_id: str, before: int = 0, run_id: str | None = None) -> str:
    """The id of the DAG's run (a new one after the first ``before``, or ``run_id``) once it waits for approval."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        stack.local.check_running()
        runs = [r for r in stack.runs(dag_id)[before:] if run_id in (None, r.run_id)]
        if runs:
            states = {ti.task_id: ti.state for ti in stack.task_instances(dag_id, runs[0].run_id)}
            if states.get("approve") == "awaiting_input":
                wait_for_the_deferral_to_settle(stack, dag_id, runs[0].run_id)
                return runs[0].run_id
            assert runs[0].state != "failed", stack.task_errors(dag_id)
        time.sleep(1)
    raise AssertionError(f"{dag_id}: no run waiting for approval within {RUN_TIMEOUT} s")


def wait_for_the_deferral_to_settle(stack: Stack, dag_id: str, run_id: str) -> None:
    """Wait until the scheduler has received the executor's event for the approve task's deferral.

    An answer given within milliseconds of the request (only a test is that fast) resumes the task
    while its first process is still exiting; the scheduler then reads that process's exit as a
    finished task in state running and fails it (Airflow 3.3.2)."""
    wanted = f"task_id='approve', run_id='{run_id}'"
    log = stack.local.logs / "scheduler.log"
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        if any("Received executor event" in line and wanted in line and dag_id in line
               for line in log.read_text(errors="replace").splitlines()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{dag_id}: the scheduler never received the deferral of approve in {run_id}")


def answer_required_action(page, stack: Stack, run_id: str, subject: str, option: str, dag_id: str = REPLACE,
                           shown: tuple[str, ...] = ("Hourly change against what the destination holds now",)) -> None:
    """Open the run's Required Actions page, check it shows the subject and the preview, click ``option``."""
    from playwright.sync_api import expect

    page.goto(f"{stack.url}/dags/{dag_id}/runs/{run_id}/tasks/approve/required_actions", wait_until="networkidle")
    expect(page.get_by_text(subject).first).to_be_visible()
    for text in ("events that would be sent", *shown):
        expect(page.get_by_text(text).first).to_be_visible()
    page.get_by_role("button", name=option, exact=True).click()


def replace_subject(start: datetime, end: datetime) -> str:
    return f"Re-bill (REPLACE) orb for [{start.isoformat()}, {end.isoformat()})"


# ---------------------------------------------------------------------------------------- tests

def test_the_default_backfill_from_the_form_delivers_every_event_exactly_once(page, stack):
    first, last = stack.first_hour, stack.last_hour
    # The form's dates are logical dates, inclusive; an hourly run's logical date starts its interval.
    backfill_from_the_form(page, stack, first, last - timedelta(hours=1), runs=HOURS)

    runs = stack.wait_for_runs(DAG, HOURS, backfill=True)
    assert sorted((r.data_interval_start, r.data_interval_end) for r in runs) == [
        (first + timedelta(hours=h), first + timedelta(hours=h + 1)) for h in range(HOURS)]
    assert [r.state for r in runs] == ["success"] * HOURS, stack.task_errors(DAG)

    deliverable = stack.warehouse_ids(first - LOOKBACK, last, deliverable=True)
    anonymous = stack.warehouse_ids(first - LOOKBACK, last, deliverable=False)
    assert deliverable and anonymous
    orb = stack.sandbox("orb")
    keys = [event["idempotency_key"] for event in orb["accepted"]]
    assert set(keys) == deliverable
    assert len(keys) == len(deliverable) and orb["duplicates"] == 0, "no event twice"
    ledger = stack.ledger_keys("orb")
    assert ledger.get("delivered") == deliverable
    assert ledger.get("rejected") == anonymous
    assert set(ledger) == {"delivered", "rejected"}


def test_the_same_range_again_from_the_form_sends_nothing(page, stack):
    stack.wait_for_backfills_to_complete(DAG)
    before = stack.sandbox("orb")
    backfill_from_the_form(page, stack, stack.first_hour, stack.last_hour - timedelta(hours=1), runs=HOURS,
                           reprocess="All Runs")
    # "All Runs" clears the three runs in place (same run ids): wait for every task's second try.
    tis = stack.wait_for_tries(DAG, 2)
    # The approval is skipped by the gate: these runs are far below airflow.approve_backfills_above.
    assert {ti.state for ti in tis if ti.task_id != "approve"} == {"success"}, stack.task_errors(DAG)
    assert {ti.state for ti in tis if ti.task_id == "approve"} == {"skipped"}
    assert len(stack.runs(DAG)) == HOURS
    after = stack.sandbox("orb")
    assert after["requests"] == before["requests"], "the second backfill sent requests"
    assert len(after["accepted"]) == len(before["accepted"])


def test_each_backfill_run_met_its_delivery_deadline_alert_and_the_scheduler_ran_its_callback(stack):
    """``airflow.delivery_deadline`` is a real DeadlineAlert: the scheduler creates a deadline for each
    hourly run, finds it missed (a backfill's hours are old by design) and runs the callback on its
    executor, which logs the miss at INFO for a backfill run instead of alerting."""
    runs = {r.run_id for r in stack.runs(DAG) if r.run_type == "backfill"}
    assert runs, "needs the backfill of the first test"
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        with stack.metadata.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT dr.run_id, dr.logical_date, d.deadline_time, d.missed, c.state, c.output "
                "FROM deadline d JOIN dag_run dr ON dr.id = d.dagrun_id JOIN callback c ON c.id = d.callback_id "
                "WHERE dr.dag_id = :d AND dr.run_type = 'backfill'"), {"d": DAG}).all()
        if {r.run_id for r in rows} >= runs and all(r.state in ("success", "failed") for r in rows):
            break
        assert time.monotonic() < deadline, f"deadline callbacks not run within {RUN_TIMEOUT} s: {rows}"
        time.sleep(1)
    for row in rows:
        assert row.missed, "an hour older than the deadline is missed"
        assert row.deadline_time == row.logical_date + DELIVERY_DEADLINE
        assert row.state == "success", f"the callback failed: {row.output}"

def test_a_deliver_task_log_in_the_ui_shows_its_label_and_summary(page, stack):
    from playwright.sync_api import expect

    run = stack.runs(DAG)[0]
    tis = [ti for ti in stack.task_instances(DAG, run.run_id) if ti.task_id == "deliver"]
    labels = {ti.rendered_map_index for ti in tis}
    assert labels == set(EVENT_TABLES), "map_index_template names each mapped task after its event table"
    ti = next(ti for ti in tis if ti.rendered_map_index == "api_call")

    page.goto(f"{stack.url}/dags/{DAG}/runs/{run.run_id}/tasks/deliver/mapped/{ti.map_index}",
              wait_until="networkidle")
    expect(page.get_by_text("api_call").first).to_be_visible()
    summary = page.get_by_text("usage_billing summary: destination=orb partition=api_call")
    expect(summary.first).to_be_visible()
    text = page.locator("body").inner_text()
    assert re.search(r"run request: orb, mode=deliver \(fixed by the DAG segment_to_orb\), window", text), \
        "the run's request is echoed in the log"
    # The log shown is the last try's, the second backfill's: everything in the window was settled,
    # delivered or rejected at the same load (left to a replay, not rejected again).
    counts = {name: int(re.search(pattern, text).group(1)) for name, pattern in (
        ("skipped", r"skipped\s+(\d+) already settled"), ("accepted", r"accepted\s+(\d+)"),
        ("rejected", r"rejected\s+(\d+) \("))}
    start, end = run.data_interval_start - LOOKBACK, run.data_interval_end
    assert counts == {
        "skipped": len(stack.warehouse_ids(start, end, deliverable=True, tables=["api_call"]))
        + len(stack.warehouse_ids(start, end, deliverable=False, tables=["api_call"])),
        "accepted": 0,
        "rejected": 0,
    }
    assert counts["skipped"] > 0


def test_rebilling_a_period_after_approving_it_and_replaying_rejections_through_the_trigger_forms(page, stack):
    start, end = stack.first_hour, stack.first_hour + timedelta(hours=1)
    expected = stack.warehouse_ids(start, end, deliverable=True, column="timestamp")
    assert expected

    run_id = trigger_replace(page, stack, start, end)
    assert not [b for b in stack.sandbox("orb")["backfills"] if b["replace_existing_events"]], "nothing before Approve"
    answer_required_action(page, stack, run_id, replace_subject(start, end), "Approve")
    [run] = stack.wait_for_runs("segment_to_orb_replace", 1)
    assert run.state == "success", stack.task_errors("segment_to_orb_replace")
    assert (f"run request: orb, mode=replace (fixed by the DAG segment_to_orb_replace), period "
            f"[{start.isoformat()}, {end.isoformat()})") in stack.task_log("segment_to_orb_replace", run.run_id, "plan")
    orb = stack.sandbox("orb")
    replaced = [b for b in orb["backfills"] if b["replace_existing_events"]]
    assert len(replaced) == 1 and replaced[0]["status"] == "reflected"
    assert len(orb["accepted"]) == len({e["idempotency_key"] for e in orb["accepted"]}), "no event twice"
    rebilled = stack.ledger_rows("orb", "backfill_id = :b", b=replaced[0]["id"])
    assert {r["idempotency_key"] for r in rebilled} == expected, "every event of the period, in the backfill"
    assert {r["run_id"] for r in rebilled} == {run.run_id}

    # Replay: the anonymous api_call events get their customer in the warehouse, then one click replays
    # every rejection for a missing customer; the other tables' are rejected again (still anonymous).
    reason = "external customer ID"
    rows = stack.ledger_rows("orb", "status = 'rejected' AND reason LIKE :p", p=f"%{reason}%")
    rejected = {(r["event_table"], r["idempotency_key"]) for r in rows}
    attempts = {r["idempotency_key"]: r["attempts"] for r in rows}
    fixed = {key for table, key in rejected if table == "api_call"}
    still_anonymous = {key for table, key in rejected if table != "api_call"}
    assert fixed and still_anonymous
    with stack.warehouse.begin() as conn:
        conn.execute(sa.text(f'UPDATE "{stack.schema}".api_call SET user_id = anonymous_id WHERE user_id IS NULL'))

    def reason_contains(page, dialog):
        dialog.locator("input[name=element_reason_contains]").fill(reason)

    trigger_from_the_form(page, stack, "segment_to_orb_replay_rejected", reason_contains)
    [run] = stack.wait_for_runs("segment_to_orb_replay_rejected", 1)
    assert run.state == "success", stack.task_errors("segment_to_orb_replay_rejected")
    assert run.conf == {"reason_contains": reason}
    assert f"only rejections whose reason contains {reason!r}" in stack.task_log(
        "segment_to_orb_replay_rejected", run.run_id, "plan")
    assert fixed <= {e["idempotency_key"] for e in stack.sandbox("orb")["accepted"]}
    again = stack.ledger_rows("orb", "status = 'rejected'")
    assert {r["idempotency_key"] for r in again} == still_anonymous
    assert all(r["attempts"] == attempts[r["idempotency_key"]] + 1 for r in again), "rejected again by the replay"


def test_a_rejected_replace_sends_nothing(page, stack):
    start, end = stack.first_hour + timedelta(hours=1), stack.first_hour + timedelta(hours=2)
    run_id = trigger_replace(page, stack, start, end)
    before = stack.sandbox("orb")
    answer_required_action(page, stack, run_id, replace_subject(start, end), "Reject")
    [run] = stack.wait_for_runs(REPLACE, 1, since=1)
    states = {ti.task_id: ti.state for ti in stack.task_instances(REPLACE, run.run_id)}
    assert states == {"preview": "success", "approve": "success", "plan": "skipped", "deliver": "skipped",
                      "report": "skipped"}, stack.task_errors(REPLACE)
    after = stack.sandbox("orb")
    assert after["requests"] == before["requests"], "a rejected replace sent requests"
    assert after["backfills"] == before["backfills"] and len(after["accepted"]) == len(before["accepted"])
    assert not stack.ledger_rows("orb", "run_id = :r", r=run.run_id), "nothing written to the ledger"


def test_the_billing_view_in_the_ui_shows_what_the_ledger_holds(page, stack):
    """The plugin's page, opened from the UI's menu, against the ledger counted independently here."""
    from playwright.sync_api import expect

    with stack.warehouse.connect() as conn:
        expected = conn.execute(sa.text(
            f"SELECT to_char(event_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, destination, "
            f"count(*) FILTER (WHERE status = 'delivered') AS delivered, "
            f"count(*) FILTER (WHERE status = 'delivered' AND backfill_id IS NOT NULL) AS backfills, "
            f"count(*) FILTER (WHERE status = 'rejected') AS rejected, "
            f"count(*) FILTER (WHERE status = 'held') AS held "
            f'FROM "{stack.ledger_schema}".deliveries GROUP BY 1, 2 ORDER BY 1, 2')).all()
    assert expected
    # No sweep runs here: one day's count is stored as the sweep stores it, 3 events missing.
    swept = expected[0]
    settled = swept.delivered + swept.rejected + swept.held
    Ledger(stack.warehouse, stack.ledger_schema).record_day_counts(swept.destination, {
        date.fromisoformat(swept.day): {"warehouse": settled + 3, "delivered": swept.delivered,
                                        "rejected": swept.rejected, "held": swept.held}},
        RunRef("usage_billing_sweep", "browser-test"), datetime.now(UTC))

    assert requests.get(f"{stack.url}/billing/", timeout=30).status_code == 401, "behind Airflow's login"
    page.goto(f"{stack.url}/", wait_until="networkidle")
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Billing").click()
    page.wait_for_url("**/plugin/billing")
    view = page.frame_locator("iframe")
    expect(view.get_by_role("heading", name=re.compile("^Billing"))).to_be_visible()

    assert sum(row.backfills for row in expected) > 0, "the replace run's events went through a backfill"
    for row in expected:
        for column in ("delivered", "backfills", "rejected", "held"):
            expect(view.get_by_test_id(f"{column}-{row.destination}-{row.day}")).to_have_text(
                str(getattr(row, column)))
        if row is not swept:
            expect(view.get_by_test_id(f"counted-{row.destination}-{row.day}")).to_have_text("not counted yet")
    cell = f"{swept.destination}-{swept.day}"
    expect(view.get_by_test_id(f"warehouse-{cell}")).to_have_text(str(settled + 3))
    expect(view.get_by_test_id(f"missing-{cell}")).to_have_text("3")
    expect(view.get_by_test_id(f"counted-{cell}")).to_contain_text("by the sweep")

    reasons = view.locator("#reasons tr").filter(has_text="external customer ID")
    expect(reasons).to_have_count(1)
    expect(reasons.locator("td.n")).to_have_text(str(len(stack.ledger_rows("orb", "status = 'rejected'"))))
    link = reasons.get_by_role("link", name=re.compile("segment_to_orb_replay_rejected"))
    expect(link).to_have_attribute("href", "/dags/segment_to_orb_replay_rejected")

    [replaced] = [b for b in stack.sandbox("orb")["backfills"] if b["replace_existing_events"]]
    expect(view.get_by_test_id(f"backfill-status-{replaced['id']}")).to_have_text(replaced["status"])

    check_the_busiest_customer_and_filter_by_it(view, stack)


def check_the_busiest_customer_and_filter_by_it(view, stack: Stack) -> None:
    """The per-customer table against the ledger, then the customer filter (a form inside the view)."""
    from playwright.sync_api import expect

    with stack.warehouse.connect() as conn:
        busiest = conn.execute(sa.text(
            f"SELECT customer_id, count(*) AS delivered, "
            f"to_char(max(delivered_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS last "
            f'FROM "{stack.ledger_schema}".deliveries WHERE destination = \'orb\' AND status = \'delivered\' '
            f"AND customer_id IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")).one()
        names = conn.execute(sa.text(
            f'SELECT DISTINCT event_name FROM "{stack.ledger_schema}".deliveries WHERE destination = \'orb\' '
            f"AND status = 'delivered' AND customer_id = :c"), {"c": busiest.customer_id}).scalars().all()
        # The view's customers: of delivered, rejected and held rows, and those a hold names.
        customers = conn.execute(sa.text(
            f"SELECT count(DISTINCT coalesce(customer_id, substring(reason from 'customer ''(.*?)'' does not exist'))) "
            f'FROM "{stack.ledger_schema}".deliveries '
            f"WHERE destination = 'orb' AND status IN ('delivered', 'rejected', 'held')")).scalar_one()
    assert customers > 1, "the sample has several billing customers: the filter has something to leave out"
    customer = busiest.customer_id
    # Rejected and held events count for the customer id the ledger has for them; an older hold for a
    # customer Orb lacks only names it in its reason.
    not_delivered = stack.ledger_rows("orb", "status IN ('rejected', 'held') AND (customer_id = :c OR reason LIKE :r)",
                                      c=customer, r=f"%customer '{customer}' does not exist%")
    cell = f"orb-{customer}"
    expect(view.get_by_test_id(f"customer-delivered-{cell}")).to_have_text(str(busiest.delivered))
    expect(view.get_by_test_id(f"customer-rejected-{cell}")).to_have_text(
        str(sum(r["status"] == "rejected" for r in not_delivered)))
    expect(view.get_by_test_id(f"customer-held-{cell}")).to_have_text(
        str(sum(r["status"] == "held" for r in not_delivered)))
    row = view.locator("#customers-orb tr").filter(has=view.get_by_test_id(f"customer-delivered-{cell}"))
    expect(row).to_contain_text(busiest.last)
    for name in names:
        expect(row).to_contain_text(name or "(no name)")

    expect(view.locator("#customers-orb tr")).to_have_count(customers + 1)  # with the header
    view.locator("#customer-filter input[name=customer]").fill(customer)
    view.get_by_role("button", name="Filter").click()
    expect(view.locator("#customers-orb tr")).to_have_count(2)
    expect(view.get_by_test_id(f"customer-delivered-{cell}")).to_have_text(str(busiest.delivered))
    expect(view.locator("#customer-filter input[name=customer]")).to_have_value(customer)
    view.get_by_role("link", name="all customers").click()
    expect(view.locator("#customers-orb tr")).to_have_count(customers + 1)


def test_a_large_backfill_run_waits_for_approval_and_a_reject_sends_nothing(page, stack):
    """With airflow.approve_backfills_above at 0 (read when the run runs), a backfill run that would send one
    new event waits on its Required Actions page; Reject: the event is neither sent nor in the ledger."""
    stack.wait_for_backfills_to_complete(DAG)
    config = stack.local.config_path
    shipped = config.read_text()
    key = "held-by-the-large-backfill-gate"
    table = f'"{stack.schema}".api_call'
    hour = stack.first_hour
    [run] = [r for r in stack.runs(DAG) if r.data_interval_start == hour]
    try:
        data = yaml.safe_load(shipped)
        data["airflow"]["approve_backfills_above"] = 0
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        with stack.warehouse.begin() as conn:
            conn.execute(sa.text(f"CREATE TEMP TABLE late AS SELECT * FROM {table} WHERE user_id IS NOT NULL LIMIT 1"))
            conn.execute(sa.text("UPDATE late SET id = :id, received_at = :r"),
                         {"id": key, "r": hour + timedelta(minutes=30)})
            conn.execute(sa.text(f"INSERT INTO {table} SELECT * FROM late"))
        backfill_from_the_form(page, stack, hour, hour, runs=1, reprocess="All Runs")
        try:
            wait_for_approval_request(stack, DAG, run_id=run.run_id)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{stack.task_log(DAG, run.run_id, 'gate')[-3000:]}") from None
        # After the preview, which only reads (it looks the customers up in Orb).
        before = stack.sandbox("orb")
        answer_required_action(page, stack, run.run_id, f"Deliver orb for [{hour.isoformat()}, ", "Reject",
                               dag_id=DAG, shown=())
        stack.wait_for_backfills_to_complete(DAG)
        states = {ti.task_id: ti.state for ti in stack.task_instances(DAG, run.run_id)}
        assert states == {"gate": "success", "approve": "success", "plan": "skipped", "deliver": "skipped",
                          "backfill": "skipped", "report": "skipped"}, stack.task_errors(DAG)
        after = stack.sandbox("orb")
        assert after["requests"] == before["requests"] and key not in {e["idempotency_key"] for e in after["accepted"]}
        assert not stack.ledger_rows("orb", "idempotency_key = :k", k=key)
    finally:
        config.write_text(shipped)
        with stack.warehouse.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {table} WHERE id = :id"), {"id": key})
