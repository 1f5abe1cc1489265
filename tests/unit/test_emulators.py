"""The warehouse emulators in the test suite: skipped only when simply not installed, failed when
installed but broken (``tests/conftest.py``'s ``started_emulator``, used by the fakesnow and
bqemulator fixtures), so a broken emulator cannot pass ``make test`` as skips."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util

import pytest

from tests.conftest import started_emulator
from usage_billing.sandbox import warehouses
from usage_billing.sandbox.warehouses import EmulatorNotInstalled, EmulatorUnavailable


@contextlib.contextmanager
def failing(error: Exception):
    raise error
    yield  # pragma: no cover


def test_an_emulator_that_is_not_installed_skips():
    with pytest.raises(pytest.skip.Exception, match="not installed"), \
            started_emulator(failing(EmulatorNotInstalled("fakesnow not installed; run make .venv/.synced"))):
        pass


def test_an_installed_emulator_that_does_not_start_fails():
    with pytest.raises(pytest.fail.Exception, match="installed but did not start: the fakesnow server did not"), \
            started_emulator(failing(EmulatorUnavailable("the fakesnow server did not start"))):
        pass


def test_fakesnow_missing_is_not_installed_but_fakesnow_broken_is_unavailable(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fakesnow" else find_spec(name))
    with pytest.raises(EmulatorNotInstalled, match="fakesnow not installed"), warehouses.fakesnow_server():
        pass
    monkeypatch.undo()

    import_module = importlib.import_module

    def broken(name, *args):
        if name == "fakesnow.server":
            raise ImportError("No module named 'snowflake.connector.converter'")
        return import_module(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(EmulatorUnavailable, match="installed but does not import") as raised, \
            warehouses.fakesnow_server():
        pass
    assert not isinstance(raised.value, EmulatorNotInstalled), "a broken install must fail the tests, not skip them"


def test_bqemulator_missing_is_not_installed(tmp_path):
    with pytest.raises(EmulatorNotInstalled, match="bqemulator is not installed at"), \
            warehouses.bqemulator_server(venv=tmp_path):
        pass
