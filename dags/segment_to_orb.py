"""
### Segment warehouse -> Orb, hourly

Every hour, reads the Segment `track` events loaded into the warehouse during the run's data
interval (widened back by `source.lookback` for late loads), maps them to Orb ingestion events the
way Segment's Orb destination does, sends those not yet delivered, and records each outcome in the
ledger (`usage_billing.deliveries`).

* **plan**: validates the config file and lists the partitions (event table x hash bucket);
* **deliver**: one mapped task per partition; its log ends with a summary block;
* **report**: adds the partitions up and fails the run if one did not finish.

Backfill any range from the UI (Trigger -> Backfill) or `airflow backfill create`: events already
delivered are skipped, late-loaded events are sent. Configuration: `include/usage_billing.yaml`
(or `$USAGE_BILLING_CONFIG`) and the connections `segment_warehouse` and `orb_default`.
"""

from billing_airflow.dag_factory import build_delivery_dag

dag = build_delivery_dag("orb", doc_md=__doc__)
