"""What every settings section shares: strict models, durations, and a destination's transport settings.

Destination packages build their settings models on :class:`DeliverySettings`; the whole file is
assembled in :mod:`usage_billing.settings` from the destination registry.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class StrictSettings(BaseModel):
    # Unknown keys are typos until proven otherwise: a misspelt mapping must not silently bill wrong.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class DeliverySettings(StrictSettings):
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
    # A run rejecting more than this share of the events it processed fails loudly: a wrong field or
    # an unmapped customer must not leave a green run that billed nothing.
    max_rejected_share: float = Field(default=0.25, gt=0, le=1)

    @field_validator("retry_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)


def check_mapping(mapping: dict[str, str], setting: str) -> dict[str, str]:
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
