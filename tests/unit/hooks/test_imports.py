"""The hooks depend on the core only through its transport contract.

A hook that imported settings, the ledger or the mapping at runtime would tie transport to the
core's internals; type hints may name anything, inside ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT

HOOKS = sorted((PROJECT / "plugins" / "billing_airflow" / "hooks").glob("*.py"))
CONTRACT = "usage_billing.delivery.contract"


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


def runtime_imports(tree: ast.AST) -> list[str]:
    """Every module imported by ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if is_type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def core_imports_at_runtime(path: Path) -> list[str]:
    return [name for name in runtime_imports(ast.parse(path.read_text()))
            if name.split(".")[0] == "usage_billing" and name != CONTRACT]


def test_there_are_hooks_to_check():
    assert {path.stem for path in HOOKS} >= {"base", "orb", "kable"}


@pytest.mark.parametrize("path", HOOKS, ids=[path.name for path in HOOKS])
def test_a_hook_imports_only_the_delivery_contract_from_the_core(path: Path):
    assert core_imports_at_runtime(path) == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from usage_billing.delivery.contract import Sender", []),
    ("from usage_billing.settings_base import DeliverySettings", ["usage_billing.settings_base"]),
    ("import usage_billing.ledger", ["usage_billing.ledger"]),
    ("def f():\n    from usage_billing.delivery import job", ["usage_billing.delivery"]),
    ("if TYPE_CHECKING:\n    from usage_billing.settings_base import DeliverySettings", []),
    ("if TYPE_CHECKING:\n    pass\nelse:\n    from usage_billing.settings_base import X", ["usage_billing.settings_base"]),
], ids=["contract", "settings", "plain-import", "inside-a-function", "type-checking-only", "type-checking-else"])
def test_the_check_sees_every_runtime_import_of_the_core(tmp_path: Path, source: str, expected: list[str]):
    module = tmp_path / "hook.py"
    module.write_text(source + "\n")
    assert core_imports_at_runtime(module) == expected
