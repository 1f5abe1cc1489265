"""The settings of the Kable destination, named as in Segment's Kable destination."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import Field, field_validator

from usage_billing.settings_base import DeliverySettings, check_mapping, parse_duration


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
    # Kable documents no limit on future timestamps and Segment's Kable destination forwards them;
    # set a duration to hold events stamped further ahead than that until they are due.
    future_event_limit: timedelta | None = None

    @field_validator("properties_mappings", mode="before")
    @classmethod
    def _strings_only(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like {{statusCode: status}}, got {value!r}")
        return check_mapping(value, "properties_mappings")

    @field_validator("late_event_warning", mode="before")
    @classmethod
    def _late(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @field_validator("future_event_limit", mode="before")
    @classmethod
    def _future(cls, value: Any) -> timedelta | None:
        return None if value is None else parse_duration(value)
