"""pandas as the pipeline builds its frames: modules that build frames import ``pd`` from here.

The warehouse clients (Snowflake connector, BigQuery) install pyarrow, and pandas 3 then backs every
"string" column with Arrow, which refuses a lone surrogate at construction: a chunk holding one bad
value would fail whole instead of the mapping rejecting that row. Python-backed strings keep the
behaviour (and the measured performance) the pipeline had before pyarrow was installed.

The option is set here rather than in the package's ``__init__`` so that importing the settings (as
every DAG file does when Airflow parses it) does not import pandas.
"""

import pandas as pd

pd.set_option("mode.string_storage", "python")

__all__ = ["pd"]
