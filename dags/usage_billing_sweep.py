"""
### Completeness sweep, daily

The safety net for rows loaded later than `source.lookback`: scans `sweep.horizon` (default 7 days)
of the warehouse on the loaded-at column, for each destination, and delivers every event that is
neither delivered nor rejected (through Orb backfills when past Orb's grace period). Each task logs
a per-day table: events in the warehouse, delivered, rejected, missing before the sweep, delivered
by the sweep, still missing (zero after a successful sweep), and stores its count of each whole event
day in the ledger (`day_counts`): the Billing view's *in the warehouse* and *missing* columns. Rejected
events are left alone: re-send them with the destination's replay DAG (`segment_to_orb_replay_rejected`,
`segment_to_kable_replay_rejected`).

After each sweep, `reconcile_<destination>` compares the warehouse, the ledger and the destination's
own records per hour over the same horizon, re-sends what the destination lost, and fails when a
difference remains (for any other range: the `usage_billing_reconcile` DAG).
"""

from billing_airflow.dag_factory import build_sweep_dag

dag = build_sweep_dag(doc_md=__doc__)
