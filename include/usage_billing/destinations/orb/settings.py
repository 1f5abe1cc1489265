"""The settings of the Orb destination, named as in Segment's Orb destination."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import field_validator, model_validator

from usage_billing.settings_base import DeliverySettings, check_mapping, parse_duration


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
    # Orb accepts events of an external customer id it does not know and bills them only once such a
    # customer exists: "send" them anyway with a warning naming the customers (Segment's behaviour),
    # or "hold" them in the ledger until the customer exists (each run checks again).
    unknown_customers: Literal["send", "hold"] = "send"

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
        return check_mapping(value, "properties_mapping")

    @field_validator("grace_period", "grace_margin", mode="before")
    @classmethod
    def _grace(cls, value: Any) -> timedelta:
        return parse_duration(value)
