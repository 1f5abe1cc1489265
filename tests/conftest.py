"""Test set-up: Airflow environment (before anything imports airflow), PostgreSQL, sandboxes.

Integration tests use the real PostgreSQL at ``$TEST_DATABASE_URL`` (default: the local server,
user postgres, database test), each in throwaway schemas, and real HTTP sandboxes on loopback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
for path in (PROJECT / "include", PROJECT / "plugins"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

_HOME = tempfile.mkdtemp(prefix="usage-billing-airflow-")
# Airflow reads its configuration at import time: set it before the first `import airflow`.
os.environ["AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(PROJECT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(PROJECT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", uuid.uuid4().hex * 2)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PROJECT / "include"), str(PROJECT / "plugins"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The PostgreSQL the integration tests use; fails loudly (not skips) when it is down."""
    import sqlalchemy as sa

    engine = sa.create_engine(TEST_DATABASE_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as error:  # pragma: no cover - environment problem
        pytest.fail(f"PostgreSQL at TEST_DATABASE_URL={TEST_DATABASE_URL} is not reachable: {error}")
    finally:
        engine.dispose()
    return TEST_DATABASE_URL


@pytest.fixture
def schemas(pg_url: str) -> Iterator[tuple[str, str]]:
    """A fresh (source schema, ledger schema) pair in PostgreSQL, dropped afterwards."""
    import sqlalchemy as sa

    suffix = uuid.uuid4().hex[:10]
    names = (f"src_{suffix}", f"ledger_{suffix}")
    yield names
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        for name in names:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture
def pg_engine(pg_url: str, schemas: tuple[str, str]):
    from usage_billing.sources.postgres import create_engine

    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated Airflow metadata database (SQLite in a temp AIRFLOW_HOME), for dag.test()."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from airflow.utils import db

    db.resetdb()


@pytest.fixture(scope="session")
def fakesnow():
    """fakesnow's server (Snowflake's protocol on DuckDB) over TLS on loopback, one per session
    (``usage_billing.sandbox.warehouses``); ``REQUESTS_CA_BUNDLE`` trusts it while it runs."""
    from usage_billing.sandbox.warehouses import fakesnow_server

    with started_emulator(fakesnow_server()) as server:
        yield server


@pytest.fixture(scope="session")
def bqemulator():
    """bqemulator (BigQuery REST + Storage Read on DuckDB) from ``.venv-bqemulator``, one per session."""
    from usage_billing.sandbox.warehouses import bqemulator_server

    with started_emulator(bqemulator_server()) as server:
        yield server


@contextlib.contextmanager
def started_emulator(server: contextlib.AbstractContextManager):
    """Start an emulator: skip what needs it only when it is simply not installed; an emulator that
    is installed but does not start fails the tests (a broken emulator must not pass ``make test``)."""
    from usage_billing.sandbox.warehouses import EmulatorNotInstalled, EmulatorUnavailable

    try:
        started = server.__enter__()
    except EmulatorNotInstalled as error:
        pytest.skip(str(error))
    except EmulatorUnavailable as error:
        pytest.fail(f"the emulator is installed but did not start: {error}")
    try:
        yield started
    finally:
        server.__exit__(None, None, None)
