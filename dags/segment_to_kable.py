"""
### Segment warehouse -> Kable, hourly

Every hour, reads the Segment `track` events loaded into the warehouse during the run's data
interval (widened back by `source.lookback` for late loads), maps them to Kable usage events the
way Segment's Kable destination does, sends those not yet delivered, and records each outcome in
the ledger (`usage_billing.deliveries`, destination `kable`).

* **plan**: validates the config file and lists the partitions (event table x hash bucket);
* **deliver**: one mapped task per partition; its log ends with a summary block;
* **report**: adds the partitions up and fails the run if one did not finish.

Backfill any range from the UI (Trigger -> Backfill) or `airflow backfill create`, with nothing to
fill in: events already delivered are skipped, late-loaded events are sent. A run triggered without
a logical date delivers the last complete hour before it was triggered (its first log line says
which). This DAG only delivers; it takes no parameter. Replaying rejections is the DAG
`segment_to_kable_replay_rejected`. Configuration: `include/usage_billing.yaml` (or
`$USAGE_BILLING_CONFIG`) and the connections `segment_warehouse` and `kable_default`.
"""

from billing_airflow.dag_factory import build_delivery_dag

dag = build_delivery_dag("kable", doc_md=__doc__)
