"""
### Re-bill a period in Orb (replace), triggered by hand

Re-sends every Segment `track` event whose **event timestamp** lies in `[period_start, period_end)`
to Orb inside one Orb backfill with `replace_existing_events: true`: when the backfill closes,
everything Orb holds for that period, **for all customers**, is replaced by what this run sent.
Use it after changing a mapping rule, for a period whose data is complete (at most 31 days, not in
the future). The ledger keeps each event's earlier delivery in `usage_billing.delivery_history`.

Trigger it with both dates filled in (UTC). The first log line of every task repeats the period it
re-bills. This DAG only ever replaces: it has no schedule and cannot be backfilled, and the hourly
`segment_to_orb` cannot be switched into replace mode by a parameter.
"""

from billing_airflow.dag_factory import build_delivery_dag

dag = build_delivery_dag("orb", doc_md=__doc__, mode="replace")
