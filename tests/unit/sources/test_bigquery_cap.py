"""BigQuery's byte cap fails loudly: a query BigQuery refuses for ``maximum_bytes_billed`` stops the
task with an error naming ``source.maximum_bytes_billed`` (bqemulator does not enforce the cap, so the
refusal is faked at the client: the exception google-cloud-bigquery raises for it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from google.api_core.exceptions import BadRequest

from usage_billing.sources.bigquery.reader import BigQuerySource, BytesBilledExceeded


@dataclass
class RefusingJob:
    job_id: str = "job_capped"
    total_bytes_processed: int | None = None

    def result(self):
        raise BadRequest("Query exceeded limit for bytes billed: 1073741824. 2147483648 or higher required.",
                         errors=[{"reason": "bytesBilledLimitExceeded", "message": "Query exceeded limit"}])


@dataclass
class Client:
    project: str = "acme"
    configs: list = field(default_factory=list)

    def query(self, sql, job_config):
        self.configs.append(job_config)
        return RefusingJob()


def test_a_query_over_the_cap_fails_naming_the_setting():
    client = Client()
    source = BigQuerySource(client, None, "prod_api", "usage_billing_results", maximum_bytes_billed=2**30)
    with pytest.raises(BytesBilledExceeded) as refused:
        source._scalar("SELECT COUNT(*) FROM `acme.prod_api.api_call`", [])
    message = str(refused.value)
    assert "source.maximum_bytes_billed = 1073741824 bytes (1.0 GiB)" in message and "job_capped" in message
    assert "2147483648 or higher required" in message, "BigQuery's own words are kept"
    assert [c.maximum_bytes_billed for c in client.configs] == [2**30]


@pytest.mark.parametrize("cap", [None, 0], ids=["none", "zero"])
def test_a_source_without_a_cap_cannot_be_built(cap):
    with pytest.raises(ValueError, match=r"source\.maximum_bytes_billed"):
        BigQuerySource(Client(), None, "prod_api", "usage_billing_results", maximum_bytes_billed=cap)
