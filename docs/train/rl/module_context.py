"""Exploratory: does a task's module source, put before its prompt, help a small model pass held-out tasks?

The exec tasks' prompts are a function's signature and docstring alone (``train.exec_tasks``), while the model was
pretrained on whole files, and many reference bodies call the module's own helpers. This script scores the held-out
tasks whose modules are in this machine's standard library, through the compiled engine (``bench.eval_engine --suite
exec``), once as they are and once with the module's source up to the task's top-level ``def`` or ``class`` put in
front of the prompt (the engine keeps the prompt's last ``context − max_new_tokens − 1`` tokens, so the signature and
docstring always stay). The check is the task's own, so only what the model sees changes.

    python docs/train/rl/module_context.py --tasks bench/data/exec_heldout_v3.jsonl --engine-entry ENTRY \\
        --out docs/train/rl/module_context
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import train.exec_eval as exec_eval
from bench import eval_engine


def module_prefix(module: str, qualname: str) -> str:
    """The module's source before the top-level statement that holds ``qualname`` ("" when not found here)."""
    try:
        src = Path(importlib.util.find_spec(module).origin).read_text()
        tree = ast.parse(src)
    except (AttributeError, ImportError, OSError, SyntaxError, TypeError, ValueError):
        return ""
    top = qualname.split(".")[0]
    node = next((n for n in tree.body if getattr(n, "name", None) == top), None)
    if node is None:
        return ""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(src.splitlines(True)[: start - 1])


class _Shown:
    """A task as the generator sees it: the prompt with the module's source before it; the check is unchanged."""

    def __init__(self, task):
        self._task, self.prompt = task, module_prefix(task.module, task.qualname) + task.prompt

    def __getattr__(self, name):
        return getattr(self._task, name)


def stdlib_tasks(src: Path, dst: Path) -> int:
    lines = src.read_text().splitlines()
    keep = [x for x in lines[1:] if json.loads(x)["module"].split(".")[0] in sys.stdlib_module_names]
    dst.write_text("\n".join([lines[0], *keep]) + "\n")
    return len(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", required=True, help="a held-out task file (train.exec_tasks)")
    ap.add_argument("--engine-entry", required=True, help="a compiler.build entry of --gguf")
    ap.add_argument("--gguf", default="models/small.gguf")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", required=True, help="folder for the task subset and the two reports")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    subset = Path(tempfile.mkdtemp()) / "stdlib_tasks.jsonl"  # a subset of --tasks: not kept
    print(f"{stdlib_tasks(Path(a.tasks), subset)} standard-library tasks")
    common = ["--suite", "exec", "--gguf", a.gguf, "--tasks", str(subset), "--engine-entry", a.engine_entry,
              "--n", str(a.n), "--k", "1", "--workers", "2"]  # fmt: skip
    eval_engine.main([*common, "--out", str(out / "bare.json")])
    plain = exec_eval.generate_bodies
    exec_eval.generate_bodies = lambda gen, tok, tasks, *r, **k: plain(gen, tok, [_Shown(t) for t in tasks], *r, **k)
    eval_engine.main([*common, "--out", str(out / "module_context.json")])


if __name__ == "__main__":
    main()
