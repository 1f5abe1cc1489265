"""
### Replay rejected Kable events, triggered by hand

Re-sends the events the ledger holds as **rejected** for Kable (`usage_billing.deliveries`, status
`rejected`), read again from the warehouse and mapped with the **current** settings, under their
original idempotency keys. Use it after fixing a mapping setting or the data; events still invalid
are rejected again with the current reason.

Trigger it with no parameter to replay every rejection, or fill in `reason_contains` to replay only
the rejections whose reason contains that text. The first log line of every task says which.
"""

from billing_airflow.dag_factory import build_delivery_dag

dag = build_delivery_dag("kable", doc_md=__doc__, mode="replay_rejected")
