"""Usage billing: Segment track events from a warehouse to billing APIs, exactly once through a ledger."""

import pandas as pd

# The warehouse clients (Snowflake connector, BigQuery) install pyarrow, and pandas 3 then backs every
# "string" column with Arrow, which refuses a lone surrogate at construction: a chunk holding one bad
# value would fail whole instead of the mapping rejecting that row. Python-backed strings keep the
# behaviour (and the measured performance) the pipeline had before pyarrow was installed.
pd.set_option("mode.string_storage", "python")
