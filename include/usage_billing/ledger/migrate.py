"""Versioning the ledger's tables with Alembic, run from code (no alembic.ini).

Every task calls :meth:`Ledger.create`, which brings the ledger to the newest revision; the CLI's
``ledger-upgrade`` does the same on demand. A ledger created before the tables were versioned
(tables present, no version table) is stamped at ``0001``, the DDL that code ran, and upgraded from
there in place. Migrations are additive: there is no downgrade, a rollback is a restore.
"""

from __future__ import annotations

import functools
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).with_name("migrations")
UNVERSIONED = "0001"  # the revision whose DDL the unversioned ledger ran


def config(connection: sa.Connection, schema: str) -> Config:
    """An Alembic configuration for the ledger in ``schema``, migrating over ``connection``."""
    settings = Config()
    settings.set_main_option("script_location", str(MIGRATIONS))
    settings.attributes["connection"] = connection
    settings.attributes["schema"] = schema
    return settings


@functools.cache
def _scripts() -> ScriptDirectory:
    """The migration scripts (read once per process: they do not change under it)."""
    settings = Config()
    settings.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(settings)


def head() -> str:
    """The newest revision this code knows."""
    revision = _scripts().get_current_head()
    if revision is None:  # pragma: no cover - a packaging mistake
        raise RuntimeError(f"no ledger migrations found in {MIGRATIONS}")
    return revision


def is_newer(revision: str | None) -> bool:
    """Whether a ledger at ``revision`` was upgraded by a newer release than this code: during a
    rolling deployment older tasks keep running on it (migrations are additive) and leave it alone."""
    return revision is not None and revision not in {script.revision for script in _scripts().walk_revisions()}


def current_revision(connection: sa.Connection, schema: str) -> str | None:
    """The revision the ledger in ``schema`` is at; None when it is not versioned (or absent)."""
    context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    return context.get_current_revision()


def upgrade(connection: sa.Connection, schema: str) -> None:
    """Bring the ledger in ``schema`` to the newest revision; the caller holds the DDL lock."""
    settings = config(connection, schema)
    if current_revision(connection, schema) is None and sa.inspect(connection).has_table("deliveries", schema=schema):
        # Created by the unversioned ledger: its tables are revision 0001 exactly.
        command.stamp(settings, UNVERSIONED)
    command.upgrade(settings, "head")
