"""Every test carries exactly one cost marker, unit / build / e2e (docs/tests.md), from its module's ``pytestmark``
or its own decorators: read from the source (no test module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

KINDS = {"unit", "build", "e2e"}
TESTS = Path(__file__).resolve().parent


def kinds_in(node) -> set[str]:
    """The cost markers named by ``pytest.mark.X`` expressions anywhere under ``node``."""
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and n.attr in KINDS and ast.unparse(n.value).endswith("pytest.mark")
    }


def unmarked() -> list[str]:
    bad = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module = set()
        for n in tree.body:
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets):
                module |= kinds_in(n.value)
        funcs = [(n, set()) for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for c in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("Test")):
            funcs += [(f, kinds_in(ast.Module(c.decorator_list, []))) for f in c.body if isinstance(f, ast.FunctionDef)]
        for f, outer in funcs:
            if f.name.startswith("test_"):
                got = module | outer | kinds_in(ast.Module(f.decorator_list, []))
                if len(got) != 1:
                    bad.append(f"{path.name}::{f.name} {sorted(got)}")
    return bad


def test_every_test_has_exactly_one_cost_marker():
    assert unmarked() == []
