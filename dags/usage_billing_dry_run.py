"""
### Dry run: preview a delivery or a re-bill, nothing sent

Shows what delivering (`mode = deliver`, the range on the loaded-at column, like an hourly or
backfill run) or re-billing (`mode = replace`, the range on the event timestamp) a range would do,
through the very code that bills: per UTC day x customer x event name what would be sent, what
would go through Orb backfills, what would be rejected and why, which customers Orb does not have,
and for a replace how each hour Orb holds now would change. Nothing is sent, nothing is written to
the ledger.

Trigger with params `destination`, `mode`, `start` and `end` (UTC, ISO 8601, end exclusive) from the
UI, or `airflow dags test usage_billing_dry_run --conf '{"destination": "orb", "mode": "replace",
"start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z"}'` and read the task log.
"""

from billing_airflow.dry_run_dag import build_dry_run_dag

dag = build_dry_run_dag(doc_md=__doc__)
