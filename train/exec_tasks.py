"""Execution tasks: corpus functions whose docstrings carry doctests, each a prompt and a check that runs.

* **Task**: one top-level function, or one method of a top-level class, of a corpus file, whose docstring holds ``>>>``
  examples. The **prompt** is the (dedented) decorators, signature and the whole docstring *with* the examples and
  their outputs (as HumanEval shows its examples), ending at the docstring's closing quotes: the prompt form of
  ``train.eval``'s validity rate, so the completion is cut by the same :func:`train.eval.cut_body`. The **check** is
  those examples, run by :mod:`doctest` (``ELLIPSIS``, ``NORMALIZE_WHITESPACE``).
* **Program** (:func:`program`): a whole script that imports the function's module, compiles ``prompt + body`` in the
  module's namespace (its imports and helpers stay visible), puts the candidate in place of the original (on the class
  for a method), runs the examples with the module's globals, and prints one ``EXEC-RESULT`` line carrying a nonce
  drawn when the program was built. It passes when it exits 0 **and** that line says every example passed: a body
  that calls ``sys.exit(0)`` or ``os._exit(0)`` does not pass. Programs run in :mod:`train.sandbox`.
* **Kept** only when, in the sandbox, the original body passes (twice: the check is deterministic) and a body that
  returns ``None`` fails (the check can fail). The task's module is the sandbox's ``preload`` (imported before its
  guard is armed: scipy and sympy import ``ctypes``, asyncio ``socket``); checks that need more at run time (a lazy
  import of a refused module, a socket, a subprocess) drop out here.
* **Reward** (:func:`reward`, for ``train.rl``): 1 when every example passes; otherwise 0.1 for a body that parses,
  0.2 if no example raised, plus 0.5 × the fraction of examples that passed (< 0.7 in all).
* **Files**: JSONL, a header line (``kind``, ``version``, ``split``, the manifest's sha256, Python version, counts)
  then one task per line, sorted by ``task_id``. A task set mined from a held-out split (``val``, or ``exec``:
  ``train.corpus --exec-file-frac``) is evaluation-only: ``train.rl`` refuses it.

    python -m train.exec_tasks --manifest data/corpus/manifest.jsonl --split val --out data/exec/heldout.jsonl
    python -m train.exec_tasks --manifest data/corpus/manifest.jsonl --split train --limit 4000 --out train_tasks.jsonl
    python -m train.exec_tasks --manifest data/corpus/manifest.jsonl --split train --max-body-lines 2 \
        --packages sympy,_pydecimal --out short_tasks.jsonl       # a curriculum of short bodies
"""

from __future__ import annotations

import argparse
import ast
import doctest
import hashlib
import json
import platform
import random
import re
import secrets
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from train.completion import is_valid_function
from train.corpus import SourceFile, doctest_candidates, read_manifest
from train.sandbox import Limits, Outcome, run_many

VERSION = 1
KIND = "exec-tasks"
RESULT_TAG = "EXEC-RESULT"
MAX_PROMPT_CHARS = 3000
MAX_EXAMPLES = 30
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
LIMITS = Limits(cpu_s=4.0, wall_s=10.0)  # a check imports its module (scipy: ~1 s) before it runs


@dataclass(frozen=True)
class Task:
    task_id: str  # "<root>/<relative path>::<qualname>"
    package: str  # the corpus package (first path component under the root)
    module: str  # dotted import name of the file
    qualname: str  # "name" or "Class.name"
    prompt: str  # decorators + signature + docstring, dedented, ending at the closing quotes
    check: str  # the docstring's doctest examples
    reference: str  # the original body as a completion (what cut_body would return); never shown to a model
    examples: int  # number of doctest examples

    @property
    def method(self) -> bool:
        return "." in self.qualname


@dataclass(frozen=True)
class Verdict:
    """What one program run says about a candidate."""

    passed: bool
    attempted: int  # examples run (0 when the harness never reported)
    failed: int  # examples with a wrong result or an exception
    raised: int  # examples that raised
    status: str  # the sandbox's status


def module_name(path: str) -> str | None:
    """Dotted import name of a source file, from the longest ``sys.path`` entry holding it (None if none does)."""
    p = Path(path)
    best = None
    for entry in sys.path:
        if not entry:
            continue
        try:
            rel = p.relative_to(Path(entry))
        except ValueError:
            continue
        if best is None or len(rel.parts) < len(best.parts):
            best = rel
    if best is None or best.suffix != ".py":
        return None
    parts = list(best.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or not all(s.isidentifier() for s in parts):
        return None
    return ".".join(parts)


def _docstring_node(node) -> ast.Expr | None:
    doc = node.body[0] if node.body else None
    if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        return doc
    return None


def _task_from(node, lines: list[str], qualname: str, rel_id: str, package: str, module: str) -> Task | None:
    """A task from a function node (None when it has no doctest, no body, or does not dedent cleanly)."""
    doc = _docstring_node(node)
    if doc is None or len(node.body) < 2 or ">>>" not in doc.value.value:
        return None
    try:
        examples = doctest.DocTestParser().get_examples(doc.value.value)
    except ValueError:  # malformed doctest (inconsistent indentation)
        return None
    if not 1 <= len(examples) <= MAX_EXAMPLES:
        return None
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    text = textwrap.dedent("".join(lines[start - 1 : node.end_lineno]))
    if not text.startswith(("def ", "async def ", "@")):
        return None  # a multi-line string at column 0 in the body: dedent could not strip the indentation
    split = doc.end_lineno - start + 1
    flat = text.split("\n")
    prompt = "\n".join(flat[:split]).rstrip()
    reference = "\n" + "\n".join(flat[split:]).rstrip() + "\n"
    if len(prompt) > MAX_PROMPT_CHARS or not is_valid_function(prompt, reference):
        return None
    return Task(f"{rel_id}::{qualname}", package, module, qualname, prompt, doc.value.value, reference, len(examples))


def file_tasks(f: SourceFile) -> list[Task]:
    """Every candidate task of one corpus file (unvalidated)."""
    module = module_name(f.path)
    if module is None:
        return []
    try:
        source = Path(f.path).read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    rel_id = f"{f.root}/{module.replace('.', '/')}"
    out = []
    for fn, qualname in doctest_candidates(tree):
        task = _task_from(fn, lines, qualname, rel_id, f.package, module)
        if task is not None:
            out.append(task)
    return out


_HARNESS = """\
import doctest as _doctest
import importlib as _importlib
import sys as _sys

_NONCE, _MODULE, _QUALNAME = {nonce!r}, {module!r}, {qualname!r}
_SOURCE = {source!r}
_CHECK = {check!r}


def _run():
    mod = _importlib.import_module(_MODULE)
    ns = mod.__dict__
    owner = None
    if "." in _QUALNAME:
        owner = getattr(mod, _QUALNAME.split(".")[0])
    name = _QUALNAME.split(".")[-1]
    local = {{}}
    exec(compile(_SOURCE, "<candidate>", "exec"), ns, local)
    if owner is None:
        ns[name] = local[name]
    else:
        setattr(owner, name, local[name])
    counts = {{"raised": 0}}

    class Runner(_doctest.DocTestRunner):
        def report_unexpected_exception(self, out, test, example, exc_info):
            counts["raised"] += 1

        def report_failure(self, out, test, example, got):
            pass

    test = _doctest.DocTestParser().get_doctest(_CHECK, dict(ns), _QUALNAME, "<check>", 0)
    runner = Runner(optionflags={flags}, verbose=False)
    result = runner.run(test, out=lambda s: None, clear_globs=False)
    return result.attempted, result.failed, counts["raised"]


attempted, failed, raised = _run()
print("\\n{tag}", _NONCE, attempted, failed, raised, flush=True)
_sys.exit(0 if attempted and not failed else 1)
"""


def program(task: Task, body: str, nonce: str | None = None) -> tuple[str, str]:
    """``(script, nonce)``: the script runs ``task``'s check on ``prompt + body``; see the module docstring."""
    nonce = nonce or secrets.token_hex(8)
    source = task.prompt + body
    script = _HARNESS.format(nonce=nonce, module=task.module, qualname=task.qualname, source=source, check=task.check,
                             flags=DOCTEST_FLAGS, tag=RESULT_TAG)  # fmt: skip
    return script, nonce


_RESULT = re.compile(rf"^{RESULT_TAG} ([0-9a-f]+) (\d+) (\d+) (\d+)$", re.M)


def verdict(outcome: Outcome, nonce: str) -> Verdict:
    """Read a program's run: passed only with exit 0 and the nonce's result line reporting no failure."""
    found = [m for m in _RESULT.finditer(outcome.stdout) if m.group(1) == nonce]
    if not found:
        return Verdict(False, 0, 0, 0, outcome.status)
    attempted, failed, raised = (int(x) for x in found[-1].groups()[1:])
    passed = outcome.passed and attempted > 0 and failed == 0
    return Verdict(passed, attempted, failed, raised, outcome.status)


def reward(task: Task, body: str, v: Verdict) -> float:
    """1 when every example passes; else 0.1 (parses) + 0.1 (no example raised) + 0.5 × examples passed."""
    if v.passed:
        return 1.0
    if not is_valid_function(task.prompt, body):
        return 0.0
    if not v.attempted:
        return 0.1
    return 0.1 + 0.1 * (v.raised == 0) + 0.5 * (v.attempted - v.failed) / v.attempted


def stub_body(task: Task) -> str:
    """A body that returns None, indented like the reference: the check must fail on it."""
    indent = next((ln[: len(ln) - len(ln.lstrip())] for ln in task.reference.split("\n") if ln.strip()), "    ")
    return f"\n{indent}return None\n"


def check_many(tasks: list[Task], bodies: list[str], limits: Limits, workers: int = 0) -> list[Verdict]:
    """Run each task's check on its body in the sandbox, in parallel."""
    built = [program(t, b) for t, b in zip(tasks, bodies, strict=True)]
    outcomes = run_many([s for s, _ in built], limits, workers, preloads=[(t.module,) for t in tasks])
    return [verdict(o, n) for o, (_, n) in zip(outcomes, built, strict=True)]


UNPARSED = Verdict(False, 0, 0, 0, "failed")  # what a body that does not compile gets: no result line, exit 1


def check_candidates(tasks: list[Task], bodies: list[str], limits: Limits, workers: int = 0) -> list[Verdict]:
    """:func:`check_many` for sampled candidates (pass@k, RL rewards), running fewer programs: a body that is not
    one valid function (``is_valid_function``) cannot pass and scores 0 (:func:`reward`), so it gets
    :data:`UNPARSED` without a run; a body repeated for one task runs once and its repeats share the verdict (the
    task's check is deterministic, :func:`validate` keeps no other; a body that draws random numbers gets one of its
    verdicts for all its repeats). Each run imports the task's module in a fresh sandbox, which is most of its cost
    (sympy: ~0.5 s)."""
    out: list[Verdict | None] = [None] * len(tasks)
    first: dict[tuple[str, str], int] = {}  # (task, body) -> index of the run
    todo: list[int] = []
    for i, (t, b) in enumerate(zip(tasks, bodies, strict=True)):
        if not is_valid_function(t.prompt, b):
            out[i] = UNPARSED
        elif first.setdefault((t.task_id, b), i) == i:
            todo.append(i)
    ran = check_many([tasks[i] for i in todo], [bodies[i] for i in todo], limits, workers)
    verdicts = dict(zip(todo, ran, strict=True))
    for i, (t, b) in enumerate(zip(tasks, bodies, strict=True)):
        if out[i] is None:
            out[i] = verdicts[first[t.task_id, b]]
    return out  # type: ignore[return-value]


def validate(tasks: list[Task], limits: Limits, workers: int = 0, progress: bool = True,
             journal: Path | None = None) -> tuple[list[Task], Counter]:  # fmt: skip
    """Keep the tasks whose reference passes twice and whose stub fails; count why the others dropped out.

    ``journal``: a JSONL file that each chunk's verdicts are appended to (``{"task_id", "why"}``, ``why`` null for a
    kept task) as soon as they are known. A run that finds one validates only the tasks it does not name, so a killed
    run is continued where it stopped, with the same result."""
    done = _read_journal(journal, limits) if journal else {}
    why: Counter = Counter()
    kept = []
    todo = []
    for t in tasks:
        if t.task_id not in done:
            todo.append(t)
        elif done[t.task_id] is None:
            kept.append(t)
        else:
            why[done[t.task_id]] += 1
    chunk = 64
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="validating", unit="task", disable=not progress)
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        runs = check_many(part * 3, [t.reference for t in part] * 2 + [stub_body(t) for t in part], limits, workers)
        n = len(part)
        lines = []
        for j, t in enumerate(part):
            first, second, stub = runs[j], runs[n + j], runs[2 * n + j]
            if not first.passed:
                reason = f"reference {first.status}" if not first.attempted else "reference fails its examples"
            elif not second.passed:
                reason = "not deterministic"
            elif stub.passed:
                reason = "a stub passes"
            else:
                reason = None
                kept.append(t)
            if reason:
                why[reason] += 1
            lines.append(json.dumps({"task_id": t.task_id, "why": reason}) + "\n")
        if journal:
            with journal.open("a") as fh:
                fh.write("".join(lines))
        bar.update(n)
    bar.close()
    kept_ids = {id(t) for t in kept}
    return [t for t in tasks if id(t) in kept_ids], why  # in the order given


def _read_journal(path: Path, limits: Limits) -> dict[str, str | None]:
    """task_id -> why it dropped (None: kept), from a :func:`validate` journal (a new one is started with a line
    naming ``limits``; one written under other limits is refused); a torn last line is ignored."""
    out: dict[str, str | None] = {}
    head = {"journal": KIND, "limits": asdict(limits)}
    if not path.is_file() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(head) + "\n")
        return out
    text = path.read_text()
    if not text.endswith("\n"):  # a killed run's torn last line: end it, so the next verdict starts a line
        with path.open("a") as fh:
            fh.write("\n")
    lines = text.splitlines()
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if first != head:
        raise TaskFileError(f"{path}: not a validation journal of these limits ({asdict(limits)}): remove it or "
                            "name another")  # fmt: skip
    for line in lines[1:]:
        try:
            row = json.loads(line)
            out[str(row["task_id"])] = None if row["why"] is None else str(row["why"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the line a killed run was writing
    return out


def body_lines(task: Task) -> int:
    """Lines of code in the task's reference body (blank and comment-only lines not counted)."""
    return sum(1 for line in task.reference.split("\n") if line.strip() and not line.strip().startswith("#"))


def cap_per_package(tasks: list[Task], n: int, seed: int = 0) -> list[Task]:
    """At most ``n`` tasks of each package (a seeded sample of a larger one), sorted by ``task_id``."""
    rng, by_pkg = random.Random(seed), defaultdict(list)
    for t in tasks:
        by_pkg[t.package].append(t)
    kept = []
    for pkg in sorted(by_pkg):
        group = by_pkg[pkg]
        kept += group if len(group) <= n else rng.sample(group, n)
    return sorted(kept, key=lambda t: t.task_id)


def mine_tasks(files: list[SourceFile], limits: Limits = LIMITS, workers: int = 0, progress: bool = True,
               limit: int = 0, seed: int = 0, per_package: int = 0, journal: Path | None = None,
               max_body_lines: int = 0, packages: frozenset[str] = frozenset(),
               ) -> tuple[list[Task], Counter]:  # fmt: skip
    """Candidate tasks of ``files``, at most ``per_package`` of each package and ``limit`` in all (seeded samples;
    0 = all), validated (``journal``: see :func:`validate`). ``max_body_lines`` keeps only candidates whose reference
    body has at most that many lines of code (:func:`body_lines`; 0 = any: a curriculum of short bodies for a model
    that passes few long ones); ``packages``, when given, keeps only those packages."""
    found = [t for f in tqdm(files, desc="parsing", unit="file", disable=not progress) for t in file_tasks(f)]
    found = sorted({t.task_id: t for t in found}.values(), key=lambda t: t.task_id)
    if max_body_lines:
        found = [t for t in found if body_lines(t) <= max_body_lines]
    if packages:
        found = [t for t in found if t.package in packages]
    if per_package:
        found = cap_per_package(found, per_package, seed)
    if limit and len(found) > limit:
        found = sorted(random.Random(seed).sample(found, limit), key=lambda t: t.task_id)
    return validate(found, limits, workers, progress, journal)


def write_tasks(path: Path, tasks: list[Task], header: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"kind": KIND, "version": VERSION, **header, "n_tasks": len(tasks),
            "n_packages": len({t.package for t in tasks})}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(head) + "\n")
        for t in sorted(tasks, key=lambda t: t.task_id):
            fh.write(json.dumps(asdict(t)) + "\n")
    tmp.replace(path)


class TaskFileError(ValueError):
    pass


def read_header(path: Path) -> dict:
    try:
        with Path(path).open() as fh:
            head = json.loads(fh.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskFileError(f"{path}: not a task file ({e})") from None
    if not isinstance(head, dict) or head.get("kind") != KIND or head.get("version") != VERSION:
        raise TaskFileError(f"{path}: not a version-{VERSION} {KIND} file")
    return head


def load_tasks(path: Path) -> list[Task]:
    """The tasks of a task file (its header is checked; see :func:`read_header`)."""
    read_header(path)
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines()[1:], start=2):
        try:
            out.append(Task(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise TaskFileError(f"{path}:{n}: not a task ({e})") from None
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="corpus manifest (train.corpus)")
    ap.add_argument("--split", choices=("train", "val", "exec"), required=True,
                    help="the corpus split to mine (exec: train.corpus --exec-file-frac's held-out files)")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="task file (.jsonl)")
    ap.add_argument("--limit", type=int, default=0, help="validate at most this many candidates (seeded sample)")
    ap.add_argument("--per-package", type=int, default=0,
                    help="at most this many candidates of one package (seeded sample; 0: all)")  # fmt: skip
    ap.add_argument("--max-body-lines", type=int, default=0,
                    help="only candidates whose reference body has at most this many code lines (0: any)")  # fmt: skip
    ap.add_argument("--packages", default="", help="only these packages (comma-separated; default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="sandbox processes at once (0: one per core)")
    ap.add_argument("--journal", type=Path,
                    help="append each verdict here as it is known; a rerun with the same file continues a killed "
                         "run")  # fmt: skip
    args = ap.parse_args(argv)
    if not args.manifest.is_file():
        ap.error(f"{args.manifest}: no such manifest")
    files = [f for f in read_manifest(args.manifest) if f.split == args.split]
    limits = LIMITS
    try:
        tasks, why = mine_tasks(files, limits, args.workers, limit=args.limit, seed=args.seed,
                                per_package=args.per_package, journal=args.journal, max_body_lines=args.max_body_lines,
                                packages=frozenset(p for p in args.packages.split(",") if p))  # fmt: skip
    except TaskFileError as e:
        ap.error(str(e))
    header = {"split": args.split, "manifest_sha256": _sha256(args.manifest), "python": platform.python_version(),
              "limits": asdict(limits), "dropped": dict(why), "per_package": args.per_package,
              "max_body_lines": args.max_body_lines, "packages": args.packages}  # fmt: skip
    write_tasks(args.out, tasks, header)
    per_pkg = Counter(t.package for t in tasks)
    print(json.dumps({"tasks": len(tasks), "packages": len(per_pkg), "dropped": dict(why),
                      "per_package": dict(per_pkg.most_common())}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
