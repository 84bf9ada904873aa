"""The rooms' import contract, read from the source (AST; nothing is imported): who may import whom, and no cycles.

Every ``import`` / ``from ... import`` of every ``.py`` under the rooms counts, at module level and inside functions
alike (a lazy import is still a dependency), and so does ``importlib.import_module("...")`` with a literal name.

    targets    targets only (the leaf: target names, CPU flags, TVM target dicts, the CUDA runtime loader)
    model      model
    schedules  schedules, model, targets          (never compiler/ or runtime/: the compiler hands them PrimFuncs)
    compiler   compiler, schedules, model, targets (never runtime/)
    runtime    runtime, model, targets, and the one JIT edge runtime.engine -> compiler.build
    train      train, model, targets               (the compiled-engine evaluation is bench.eval_engine)
    bench      anything; and nothing but the tests imports bench

and the module graph (module -> the modules it imports) has no cycle. A failure names each offending file:line.

    pytest tests/test_imports.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # AST only (docs/tests.md)

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("targets", "model", "schedules", "compiler", "runtime", "train", "bench")
ALLOWED = {
    "targets": {"targets"},
    "model": {"model"},
    "schedules": {"schedules", "model", "targets"},
    "compiler": {"compiler", "schedules", "model", "targets"},
    "runtime": {"runtime", "model", "targets"},
    "train": {"train", "model", "targets"},
    "bench": set(ROOMS),
}
EXCEPTIONS = {("runtime.engine", "compiler.build")}  # the runtime's one lazy JIT entry point (ensure_built)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every .py under the rooms (a package is its ``__init__``)."""
    out = {}
    for room in ROOMS:
        for path in sorted((root / room).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing ``name`` runs last (``a.b.c`` → ``a.b`` when ``c`` is a name in it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(modules: dict[str, Path]) -> list[tuple[str, str, Path, int]]:
    """(importer, imported module, file, line) for every import of one of our modules."""
    edges = []
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                names = [f"{base}.{a.name}" for a in node.names]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):  # fmt: skip
                names = [node.args[0].value]
            for name in names:
                if name.split(".")[0] in ROOMS and (target := _resolve(name, modules)) and target != mod:
                    edges.append((mod, target, path, node.lineno))
    return list(dict.fromkeys(edges))


def violations(edges) -> list[str]:
    bad = []
    for src, dst, path, line in edges:
        room, to = src.split(".")[0], dst.split(".")[0]
        if to in ALLOWED[room] or (src, dst) in EXCEPTIONS:
            continue
        bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {dst} ({room} may import only "
                   f"{', '.join(sorted(ALLOWED[room]))})")  # fmt: skip
    return bad


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (a few hundred)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def edges():
    return imports(module_files())


def test_rooms_import_only_what_the_contract_allows(edges):
    bad = violations(edges)
    assert not bad, "import back-edges:\n" + "\n".join(bad)


def test_no_import_cycles(edges):
    found = cycles(edges)
    lines = []
    for comp in found:
        members = set(comp)
        lines.append("cycle: " + " <-> ".join(comp))
        lines += [
            f"  {p.relative_to(ROOT)}:{n}: {s} imports {d}" for s, d, p, n in edges if s in members and d in members
        ]
    assert not found, "\n".join(lines)


def test_only_tests_import_bench(edges):
    bad = [f"{p.relative_to(ROOT)}:{n}: {s} imports {d}" for s, d, p, n in edges
           if d.split(".")[0] == "bench" and s.split(".")[0] != "bench"]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_the_jit_edge_is_the_only_exception_and_it_exists(edges):
    """The runtime reaches the compiler at exactly one place: ``runtime.engine`` → ``compiler.build``."""
    to_compiler = {(s, d) for s, d, _, _ in edges if s.split(".")[0] == "runtime" and d.split(".")[0] == "compiler"}
    assert to_compiler == EXCEPTIONS


def test_the_checker_sees_a_back_edge_and_a_cycle(tmp_path):
    """A deliberately added back-edge (function-level) and cycle are reported with their file:line."""
    for room in ROOMS:
        (tmp_path / room).mkdir()
        (tmp_path / room / "__init__.py").write_text("")
    (tmp_path / "schedules" / "a.py").write_text("def f():\n    from compiler.b import g\n")
    (tmp_path / "compiler" / "b.py").write_text("import schedules.a\n\ndef g():\n    pass\n")
    mods = module_files(tmp_path)
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        es = imports(mods)
        assert violations(es) == [
            "schedules/a.py:2: schedules.a imports compiler.b (schedules may import only model, schedules, targets)"
        ]
        assert cycles(es) == [["compiler.b", "schedules.a"]]
    finally:
        ROOT = root
