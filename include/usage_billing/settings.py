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
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from usage_billing.naming import check_identifier

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "usage_billing.yaml"
CONFIG_ENV_VAR = "USAGE_BILLING_CONFIG"
# Deployment-specific override of airflow.rate_limit_storage (e.g. redis://redis:6379/1 in compose).
RATE_LIMIT_ENV_VAR = "USAGE_BILLING_RATE_LIMIT_STORAGE"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message names the setting."""


def parse_duration(value: Any) -> timedelta:
    """Parse ``90s``, ``30m``, ``6h``, ``7d`` (or a number of seconds) into a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 6h, got {value!r}")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration like 90s, 30m, 6h or 7d, got {value!r}")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


class _Settings(BaseModel):
    # Unknown keys are typos until proven otherwise: a misspelt mapping must not silently bill wrong.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SourceSettings(_Settings):
    """Where the Segment track events are: one warehouse table per event (Segment Warehouses)."""

    conn_id: str = "segment_warehouse"
    layout: Literal["segment_event_tables"] = "segment_event_tables"
    schema_: str = Field(alias="schema")
    events: list[str] = Field(min_length=1)
    loaded_at_column: str = "received_at"
    lookback: timedelta = timedelta(hours=6)
    chunk_size: int = Field(default=50_000, ge=100, le=1_000_000)
    max_event_age_warning: timedelta = timedelta(days=3)
    # BigQuery only: every query carries this cap (bytes); BigQuery fails a query that would bill more.
    maximum_bytes_billed: int | None = Field(default=None, ge=1)

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

    @field_validator("lookback", "max_event_age_warning", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)


class LedgerSettings(_Settings):
    """Where the delivered / rejected record lives (schema ``usage_billing`` of that database)."""

    conn_id: str = "segment_warehouse"
    schema_: str = Field(default="usage_billing", alias="schema")

    @field_validator("schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return check_identifier(value, "identifier")


class DeliverySettings(_Settings):
    """Transport settings shared by every destination: batching, concurrency, pacing, retries."""

    batch_size: int = Field(default=500, ge=1, le=500)
    concurrency: int = Field(default=4, ge=1, le=64)
    requests_per_second: float = Field(default=100.0, gt=0)
    events_per_minute: float = Field(default=10_000.0, gt=0)
    timeout: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=8, ge=1, le=50)
    backoff_initial: float = Field(default=1.0, ge=0)
    backoff_max: float = Field(default=60.0, ge=0)
    retry_budget: timedelta = timedelta(minutes=10)
    max_string_length: int = Field(default=512, ge=1)

    @field_validator("retry_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)


def _check_mapping(mapping: dict[str, str], setting: str) -> dict[str, str]:
    for source, target in mapping.items():
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{setting}: every key must be a non-empty string, got {source!r}")
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"{setting}: the value for {source!r} must be a non-empty string, got {target!r}")
    targets = list(mapping.values())
    duplicated = sorted({t for t in targets if targets.count(t) > 1})
    if duplicated:
        raise ValueError(f"{setting}: several keys map to the same name {duplicated}")
    return mapping


class OrbSettings(DeliverySettings):
    """Orb destination, with the settings of Segment's Orb destination."""

    conn_id: str = "orb_default"
    event_name_field: str = "event"
    external_customer_id_field: str
    idempotency_key_field: str = "messageId"
    # Strict types: Segment's Orb destination says every key and value of this map is a string.
    properties_mapping: dict[str, str]
    # Orb's account grace period: older events are delivered inside Orb backfills. The margin sends
    # events close to the boundary through a backfill too, since retries may delay them.
    grace_period: timedelta = timedelta(hours=12)
    grace_margin: timedelta = timedelta(hours=1)

    @model_validator(mode="after")
    def _margin_below_grace(self) -> OrbSettings:
        if self.grace_margin >= self.grace_period:
            raise ValueError(f"grace_margin ({self.grace_margin}) must be shorter than grace_period "
                             f"({self.grace_period})")
        return self

    @field_validator("properties_mapping", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like {{amount: amount}}, got {value!r}")
        return _check_mapping(value, "properties_mapping")

    @field_validator("grace_period", "grace_margin", mode="before")
    @classmethod
    def _grace(cls, value: Any) -> timedelta:
        return parse_duration(value)


class KableSettings(DeliverySettings):
    """Kable destination, with the settings of Segment's Kable destination."""

    conn_id: str = "kable_default"
    client_id_field: str = "userId"
    properties_mappings: dict[str, str] = Field(default_factory=dict)
    # Kable events have no event-name field; when set, the Segment event name is added to `data`
    # under this key so several event types can share one Kable account.
    event_name_key: str | None = None
    # Kable's SDKs never retry forever and document no rate limit; 20 requests/s is a polite default.
    requests_per_second: float = Field(default=20.0, gt=0)
    events_per_minute: float = Field(default=300_000.0, gt=0)
    late_event_warning: timedelta = timedelta(hours=24)

    @field_validator("properties_mappings", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like {{statusCode: status}}, got {value!r}")
        return _check_mapping(value, "properties_mappings")

    @field_validator("late_event_warning", mode="before")
    @classmethod
    def _late(cls, value: Any) -> timedelta:
        return parse_duration(value)


class DestinationsSettings(_Settings):
    orb: OrbSettings | None = None
    kable: KableSettings | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> DestinationsSettings:
        if self.orb is None and self.kable is None:
            raise ValueError("configure at least one destination (orb or kable)")
        return self


class AirflowSettings(_Settings):
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

    @field_validator("retry_delay", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @field_validator("start_date", mode="after")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class SweepSettings(_Settings):
    """The daily completeness sweep (DAG ``usage_billing_sweep``)."""

    schedule: str = "30 3 * * *"
    horizon: timedelta = timedelta(days=7)

    @field_validator("horizon", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)


class Settings(_Settings):
    """The whole configuration file."""

    source: SourceSettings
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    destinations: DestinationsSettings
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)

    def configured_destinations(self) -> list[str]:
        return [name for name in ("orb", "kable") if getattr(self.destinations, name) is not None]

    def destination(self, name: str) -> OrbSettings | KableSettings:
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
