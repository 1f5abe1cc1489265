"""The pipeline's YAML configuration as typed, validated settings.

Everything that is not a secret lives in one YAML file: ``include/usage_billing.yaml`` by default,
or the path in ``$USAGE_BILLING_CONFIG``. Secrets (API keys, database passwords) live only in
Airflow connections, which the settings name by ``conn_id``.

Setting names follow the Segment destination settings a user already knows
(``external_customer_id_field``, ``properties_mapping``, ``client_id_field``...). A bad setting fails
at load time with a message naming the setting and the file, for example::

    include/usage_billing.yaml: destinations.orb.external_customer_id_field: Field required
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from usage_billing.destinations import DESTINATIONS
from usage_billing.naming import check_identifier
from usage_billing.settings_base import ConfigError, DeliverySettings, StrictSettings, parse_duration

__all__ = ["ConfigError", "DeliverySettings", "Settings", "SourceSettings", "load_settings", "parse_duration",
           "parse_settings"]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "usage_billing.yaml"
CONFIG_ENV_VAR = "USAGE_BILLING_CONFIG"
# Deployment-specific override of airflow.rate_limit_storage (e.g. redis://redis:6379/1 in compose).
RATE_LIMIT_ENV_VAR = "USAGE_BILLING_RATE_LIMIT_STORAGE"

# 100 GiB: at BigQuery's on-demand price (6.25 USD per TiB) at most about 0.61 USD per query.
DEFAULT_MAXIMUM_BYTES_BILLED = 100 * 2**30


class SourceSettings(StrictSettings):
    """Where the Segment track events are: one warehouse table per event (Segment Warehouses)."""

    conn_id: str = "segment_warehouse"
    layout: Literal["segment_event_tables"] = "segment_event_tables"
    schema_: str = Field(alias="schema")
    events: list[str] = Field(min_length=1)
    loaded_at_column: str = "received_at"
    lookback: timedelta = timedelta(hours=6)
    chunk_size: int = Field(default=50_000, ge=100, le=1_000_000)
    # BigQuery only: every query carries this cap (bytes); BigQuery fails a query that would bill more.
    # Always on: 100 GiB unless set (README "BigQuery", cost guard); it cannot be switched off.
    maximum_bytes_billed: int = Field(default=DEFAULT_MAXIMUM_BYTES_BILLED, ge=1)

    @field_validator("schema_", "loaded_at_column")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return check_identifier(value, "identifier")

    @field_validator("events")
    @classmethod
    def _event_tables(cls, value: list[str]) -> list[str]:
        for name in value:
            check_identifier(name, "event table")
        if len(set(value)) != len(value):
            raise ValueError("event tables are listed more than once")
        return value

    @field_validator("lookback", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)


class LedgerSettings(StrictSettings):
    """Where the delivered / rejected record lives (schema ``usage_billing`` of that database)."""

    conn_id: str = "segment_warehouse"
    schema_: str = Field(default="usage_billing", alias="schema")

    @field_validator("schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return check_identifier(value, "identifier")


class _AtLeastOne(StrictSettings):
    @model_validator(mode="after")
    def _at_least_one(self) -> _AtLeastOne:
        if all(getattr(self, name) is None for name in DESTINATIONS):
            raise ValueError(f"configure at least one destination ({' or '.join(DESTINATIONS)})")
        return self


# One optional section per registered destination (usage_billing.destinations.DESTINATIONS).
DestinationsSettings = create_model(
    "DestinationsSettings", __base__=_AtLeastOne,
    **{name: (kind.settings_model | None, None) for name, kind in DESTINATIONS.items()})


class AirflowSettings(StrictSettings):
    """How the DAGs run: schedule, retries, parallelism and shared pacing."""

    schedule: str = "0 * * * *"
    start_date: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    retries: int = Field(default=3, ge=0)
    retry_delay: timedelta = timedelta(minutes=2)
    # Delivery tasks run in this Airflow pool when set (create it first: `airflow pools set ...`).
    pool: str | None = None
    max_active_tis_per_dag: int = Field(default=4, ge=1)
    # Each event table is split into this many hash buckets of `id`, delivered by parallel tasks.
    partitions_per_table: int = Field(default=1, ge=1, le=256)
    # memory:// paces each task on its own; redis://host:6379 paces all workers together.
    rate_limit_storage: str = "memory://"
    # A replace re-bills a whole period for all customers and cannot be undone: its run waits for a
    # person's Approve in the UI's Required Actions, showing the preview. False runs it straight through.
    approve_replace: bool = True
    # An hourly run (a backfill's included) that would send more events than this waits for approval
    # too; None never asks.
    approve_backfills_above: int | None = Field(default=100_000, ge=0)
    # Dotted path of a callable or notifier (an instance, or a class built with no arguments) called
    # when any task of any DAG fails, e.g. my_alerts.slack (a SlackNotifier); None: only Airflow's UI.
    on_failure_callback: str | None = None
    # An hourly run not finished this long after its hour's start (its logical date) is flagged by a
    # DeadlineAlert: an ERROR log and the on_failure_callback. None (the default): no deadline, because
    # Airflow 3.3.2's `airflow dags test` / dag.test() cannot finish a run of a DAG that has one (the
    # demo and the as-run benchmark use it); set e.g. 3h where a scheduler runs the DAGs.
    delivery_deadline: timedelta | None = None

    @field_validator("retry_delay", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @field_validator("delivery_deadline", mode="before")
    @classmethod
    def _optional_duration(cls, value: Any) -> timedelta | None:
        return None if value is None else parse_duration(value)

    @field_validator("on_failure_callback")
    @classmethod
    def _dotted_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "." not in value.strip()):
            raise ValueError(f"expected a dotted path such as my_alerts.slack_notifier, got {value!r}")
        return value.strip() if value else None

    @field_validator("start_date", mode="after")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class SweepSettings(StrictSettings):
    """The daily completeness sweep (DAG ``usage_billing_sweep``)."""

    schedule: str = "30 3 * * *"
    horizon: timedelta = timedelta(days=7)

    @field_validator("horizon", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)


class ReconcileSettings(StrictSettings):
    """Reconciliation against the destination's own records (task ``reconcile_<destination>`` of the
    sweep DAG, over ``sweep.horizon``; DAG ``usage_billing_reconcile`` for any range)."""

    # Hours whose counts agree that are still checked key by key, chosen at random per range.
    sample_hours: int = Field(default=2, ge=0)
    # False when another system ingests into the same Orb account: its events make the hourly
    # counts differ for ever, so every hour's ledger keys are searched instead.
    compare_volume: bool = True


class Settings(StrictSettings):
    """The whole configuration file."""

    source: SourceSettings
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    destinations: DestinationsSettings
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)

    def configured_destinations(self) -> list[str]:
        return [name for name in DESTINATIONS if getattr(self.destinations, name) is not None]

    def destination(self, name: str) -> DeliverySettings:
        """The settings of one destination, or a ConfigError naming the missing section."""
        found = getattr(self.destinations, name, None)
        if found is None:
            raise ConfigError(f"destinations.{name}: not configured")
        return found


def config_path() -> Path:
    """The configuration file in use: ``$USAGE_BILLING_CONFIG`` or the default in ``include/``."""
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]).replace("schema_", "schema")
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def parse_settings(data: Any, origin: str = "<config>") -> Settings:
    """Validate already-parsed YAML; raise ConfigError naming each bad setting."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping with source/ledger/destinations, got {type(data).__name__}")
    try:
        return Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_describe(error)}") from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate the configuration file."""
    path = Path(path) if path is not None else config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration file ({error.strerror}); "
                          f"set ${CONFIG_ENV_VAR} to its path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    settings = parse_settings(data, str(path))
    storage = os.environ.get(RATE_LIMIT_ENV_VAR)
    if storage:
        settings = settings.model_copy(update={"airflow": settings.airflow.model_copy(
            update={"rate_limit_storage": storage})})
    return settings
