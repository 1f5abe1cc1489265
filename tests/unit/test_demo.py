"""``make run``'s sample size: flags size a new sample; an existing sample keeps its own, and a flag
that contradicts it fails naming ``--fresh`` (the README's ``make run ARGS="--fresh --hours 12 ..."``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from usage_billing import demo

SAMPLE = {"created_at": "2026-11-30T05:29:00+00:00", "first_hour": "2026-11-29T23:00:00+00:00",
          "hours": 6, "events_per_hour": 300}


@pytest.mark.parametrize(("hours", "per_hour", "expected"), [
    (None, None, (demo.DEFAULT_HOURS, demo.DEFAULT_EVENTS_PER_HOUR)),
    (12, 1000, (12, 1000)),
    (12, None, (12, demo.DEFAULT_EVENTS_PER_HOUR)),
], ids=["defaults", "both flags", "one flag"])
def test_a_new_sample_is_sized_by_the_flags(hours, per_hour, expected, tmp_path):
    assert demo.sample_size(hours, per_hour, None, tmp_path) == expected


@pytest.mark.parametrize(("hours", "per_hour"), [(None, None), (6, None), (6, 300)],
                         ids=["no flags", "same hours", "same sizes"])
def test_an_existing_sample_keeps_its_own_size(hours, per_hour, tmp_path):
    sample = {**SAMPLE, "hours": 12, "events_per_hour": 1000} if (hours, per_hour) == (None, None) else SAMPLE
    assert demo.sample_size(hours, per_hour, sample, tmp_path) == (sample["hours"], sample["events_per_hour"])


def test_sizes_that_contradict_the_existing_sample_fail_naming_fresh_before_anything_runs(tmp_path: Path):
    (tmp_path / "sample.json").write_text(json.dumps(SAMPLE))
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--state-dir", str(tmp_path), "--hours", "12", "--events-per-hour", "1000"])
    message = str(stopped.value)
    assert "--hours 6 --events-per-hour 300" in message, message
    assert "--hours 12 --events-per-hour 1000 add --fresh" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.json"], "nothing was created or run"
