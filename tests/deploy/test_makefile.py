"""``make test-fast``: the layers that need nothing running, and only those."""

from __future__ import annotations

import re

from tests.conftest import PROJECT

#: Layers that need a server (PostgreSQL, Redis, an emulator, a browser): never in the fast target.
NEEDS_SERVICES = {"tests/integration", "tests/e2e", "tests/browser", "tests/celery"}


def fast_tests() -> list[str]:
    match = re.search(r"^FAST_TESTS\s*:=\s*(.+)$", (PROJECT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile defines FAST_TESTS"
    return match.group(1).split()


def test_the_fast_target_runs_existing_layers_that_need_nothing_running():
    layers = fast_tests()
    assert layers == ["tests/unit", "tests/dags", "tests/deploy", "tests/test_lint.py"]
    assert all((PROJECT / layer).exists() for layer in layers)
    assert not NEEDS_SERVICES & set(layers)


def test_the_fast_target_does_not_build_the_emulators_environment():
    makefile = (PROJECT / "Makefile").read_text()
    target = re.search(r"^test-fast:(.*)$\n\t(.+)$", makefile, re.MULTILINE)
    assert target, "the Makefile has a test-fast target"
    prerequisites, recipe = target.groups()
    assert "BQEMU" not in prerequisites and "$(FAST_TESTS)" in recipe
