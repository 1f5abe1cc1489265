"""ruff is part of the test command: style problems fail CI like any other test, and so does a core
function taking more parameters than a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "dags", "plugins", "include", "tests", "scripts", "docker"],
                            cwd=PROJECT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


#: The most parameters a function of the core may take: more means arguments threaded through
#: levels that one object (a job, a request, options) should carry.
MAX_PARAMETERS = 6


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional and keyword-only parameters, ``*args`` and ``**kwargs`` one each; not self or cls."""
    arguments = function.args
    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
    bound = 1 if names and names[0] in ("self", "cls") else 0
    return len(names) - bound + (arguments.vararg is not None) + (arguments.kwarg is not None)


def too_many_parameters(source: str, name: str) -> list[str]:
    """``name:line function (count)`` of every function or method in ``source`` over the limit."""
    return [f"{name}:{node.lineno} {node.name} ({parameter_count(node)})" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and parameter_count(node) > MAX_PARAMETERS]


def test_no_function_of_the_core_takes_more_than_six_parameters():
    core = PROJECT / "include" / "usage_billing"
    found = [problem for path in sorted(core.rglob("*.py"))
             for problem in too_many_parameters(path.read_text(), str(path.relative_to(PROJECT)))]
    assert found == []


@pytest.mark.parametrize(("source", "over"), [
    ("def f(a, b, c, d, e, f): pass", False),
    ("def f(a, b, c, d, e, f, g): pass", True),
    ("class C:\n    def m(self, a, b, c, d, e, f): pass", False),
    ("class C:\n    @classmethod\n    def m(cls, a, b, c, d, e, f, g): pass", True),
    ("def f(a, b, c, d, e, *, g): pass", False),
    ("def f(a, b, c, d, e, *, f, g): pass", True),
    ("def f(a, b, c, d, *args, **kwargs): pass", False),
    ("def f(a, b, c, d, e, *args, **kwargs): pass", True),
    ("async def f(a, /, b, c, d, e, f, g): pass", True),
    ("def outer():\n    def inner(a, b, c, d, e, f, g): pass", True),
], ids=["six", "seven", "self-not-counted", "cls-not-counted", "keyword-only", "keyword-only-over", "star-args-one-each",
        "star-args-over", "positional-only-async", "nested"])
def test_the_parameter_check_counts_every_kind_of_parameter(source, over):
    assert bool(too_many_parameters(source, "m.py")) is over
