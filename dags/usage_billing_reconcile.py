"""
### Reconciliation on demand

Compares, for any range, per UTC hour of event time: the warehouse's deliverable events, the
ledger's delivered events and the destination's own count (Orb's event volume), then checks by
idempotency key every hour that disagrees and a sample (`reconcile.sample_hours`) of those that
agree. Events Orb lost are re-sent under their keys (live inside the grace period, through a
backfill beyond it) and recorded in the ledger's `findings`; events Orb holds that the ledger does
not know are reported, never deleted. Kable has no read API: the warehouse is compared with the
ledger only. The task fails when a difference remains.

Trigger with params `destination`, `start` and `end` (UTC, ISO 8601, end exclusive), from the UI
or `airflow dags trigger usage_billing_reconcile --conf '{"destination": "orb", "start":
"2026-11-01T00:00:00Z", "end": "2026-11-08T00:00:00Z"}'`. The daily sweep DAG runs the same check
over `sweep.horizon` after each sweep.
"""

from billing_airflow.dag_factory import build_reconcile_dag

dag = build_reconcile_dag(doc_md=__doc__)
