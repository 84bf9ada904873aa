"""Corpus builder: Python source files already on this machine → a deduplicated, split, auditable file list.

Roots are the interpreter's standard library (``stdlib``), the installed packages (``site-packages``) or any folder.
Exact duplicate files (same bytes) are kept once. The held-out split (``val``) is made **by file**, and whole
top-level packages are held out too, so evaluation sees code whose package the model never saw. Every decision is
deterministic (hashes of names, salted by ``seed``), and a manifest (path, root, package, size, sha256, split) is
written so the corpus can be rebuilt and audited.

``--exec-file-frac F`` also holds out, as the split ``exec``, a fraction ``F`` (by a salted hash of the file's name) of
the files that would be ``train`` and hold a function whose docstring has doctests (:func:`doctest_functions`): the
files ``train.exec_tasks`` mines its held-out execution tasks from. No stage trains on them (training reads ``train``)
and ``val``, hence held-out bits/byte, is unchanged. Being by name and content, the split is the same on every machine
for the same file.

    python -m train.corpus --roots stdlib site-packages --out data/corpus
    python -m train.corpus --out data/corpus --exec-file-frac 0.3      # the exec split, chosen before pretraining
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import site
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class CorpusConfig:
    roots: tuple[str, ...] = ("stdlib", "site-packages")
    holdout_package_frac: float = 0.03  # whole top-level packages held out
    holdout_file_frac: float = 0.01  # plus single files of the other packages
    exec_file_frac: float = 0.0  # of the train files with doctests: held out as split "exec" (execution tasks)
    min_bytes: int = 64  # skip empty and near-empty files (``__init__.py`` stubs)
    max_bytes: int = 512_000  # skip generated giants (unicode tables, vendored blobs)
    seed: int = 0


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute path when built
    root: str  # the root label, e.g. "stdlib"
    package: str  # first path component under the root ("json", "numpy", "os" for os.py)
    size: int
    sha256: str
    split: str  # "train", "val" or "exec"


@dataclass
class Corpus:
    config: CorpusConfig
    files: list[SourceFile]
    skipped: Counter = field(default_factory=Counter)

    def split(self, name: str) -> list[SourceFile]:
        return [f for f in self.files if f.split == name]

    def summary(self) -> dict:
        out = {"config": asdict(self.config), "skipped": dict(self.skipped)}
        for name in ("train", "val", "exec"):
            files = self.split(name)
            if name == "exec" and not files:
                continue
            out[name] = {
                "files": len(files),
                "bytes": sum(f.size for f in files),
                "packages": len({(f.root, f.package) for f in files}),
            }
        return out


def resolve_root(root: str) -> list[tuple[str, Path]]:
    """A root label → (label, folder) pairs. ``stdlib`` excludes its own site-packages."""
    if root == "stdlib":
        return [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    if root == "site-packages":
        dirs = [*site.getsitepackages(), site.getusersitepackages()]
        return [("site-packages", Path(d)) for d in dict.fromkeys(dirs) if Path(d).is_dir()]
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"corpus root {root!r} is not a folder (use stdlib, site-packages or a path)")
    return [(path.name, path)]


def _unit_hash(text: str, seed: int) -> float:
    """A deterministic number in [0, 1) for a name: the split must not depend on file order or the machine."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def doctest_candidates(tree: ast.Module) -> Iterator[tuple[ast.FunctionDef, str]]:
    """A module's top-level functions and the methods of its top-level classes that a doctest can call by name, with
    their qualified names: not async (a doctest cannot await), not dunder (those run through the class protocol)."""
    for node in tree.body:
        fns = [(node, node.name)] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            fns = [(n, f"{node.name}.{n.name}") for n in node.body if isinstance(n, ast.FunctionDef)]
        yield from ((fn, name) for fn, name in fns if not fn.name.startswith("__"))


def doctest_functions(source: str) -> int:
    """How many of a module's :func:`doctest_candidates` have a docstring with ``>>>`` examples (``train.exec_tasks``'
    candidates). 0 for a file that does not parse, and, without parsing, for one whose text has no ``>>>`` (a
    docstring could only spell it by escapes or by adjacent literals; such files count as having none)."""
    if ">>>" not in source:
        return 0
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return 0
    return sum(1 for fn, _ in doctest_candidates(tree) if ">>>" in (ast.get_docstring(fn) or ""))


def _walk(label: str, folder: Path):
    skip_dirs = {"__pycache__", "site-packages", "dist-packages", ".git"} if label == "stdlib" else {"__pycache__"}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.endswith((".dist-info", ".egg-info")))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def build_corpus(config: CorpusConfig, progress: bool = True) -> Corpus:
    """Walk the roots, drop unreadable/odd-sized/non-UTF-8 files and exact duplicates, and assign splits."""
    candidates = [(label, folder, p) for root in config.roots for label, folder in resolve_root(root)
                  for p in _walk(label, folder)]  # fmt: skip
    corpus = Corpus(config=config, files=[])
    seen: set[str] = set()
    for label, folder, path in tqdm(candidates, desc="scanning", unit="file", disable=not progress):
        try:
            if path.is_symlink() or not path.is_file():
                corpus.skipped["not a regular file"] += 1
                continue
            data = path.read_bytes()
        except OSError:
            corpus.skipped["unreadable"] += 1
            continue
        if not config.min_bytes <= len(data) <= config.max_bytes:
            corpus.skipped["size out of range"] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            corpus.skipped["not UTF-8"] += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            corpus.skipped["exact duplicate"] += 1
            continue
        seen.add(digest)
        rel = path.relative_to(folder)
        package = rel.parts[0].removesuffix(".py")
        held_package = _unit_hash(f"{label}/{package}", config.seed) < config.holdout_package_frac
        name = f"{label}/{rel.as_posix()}"
        held_file = _unit_hash(name, config.seed + 1) < config.holdout_file_frac
        split = "val" if held_package or held_file else "train"
        if split == "train" and _unit_hash(name, config.seed + 2) < config.exec_file_frac and doctest_functions(text):
            split = "exec"
        corpus.files.append(SourceFile(str(path), label, package, len(data), digest, split))
    return corpus


def write_manifest(corpus: Corpus, out_dir: Path) -> Path:
    """``manifest.jsonl`` (one file per line) and ``summary.json``; returns the manifest path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    tmp = manifest.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for f in corpus.files:
            fh.write(json.dumps(asdict(f)) + "\n")
    tmp.replace(manifest)
    (out_dir / "summary.json").write_text(json.dumps(corpus.summary(), indent=2) + "\n")
    return manifest


def read_manifest(path: Path) -> list[SourceFile]:
    return [SourceFile(**json.loads(line)) for line in Path(path).read_text().splitlines() if line]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roots", nargs="+", default=list(CorpusConfig.roots), help="stdlib, site-packages or folders")
    ap.add_argument("--out", type=Path, required=True, help="output folder for manifest.jsonl and summary.json")
    ap.add_argument("--holdout-package-frac", type=float, default=CorpusConfig.holdout_package_frac)
    ap.add_argument("--holdout-file-frac", type=float, default=CorpusConfig.holdout_file_frac)
    ap.add_argument("--exec-file-frac", type=float, default=CorpusConfig.exec_file_frac,
                    help="of the train files with doctests, the fraction held out as split 'exec'")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 <= args.exec_file_frac <= 1:
        ap.error(f"--exec-file-frac {args.exec_file_frac}: a fraction in [0, 1]")
    cfg = CorpusConfig(tuple(args.roots), args.holdout_package_frac, args.holdout_file_frac,
                       exec_file_frac=args.exec_file_frac, seed=args.seed)  # fmt: skip
    corpus = build_corpus(cfg)
    write_manifest(corpus, args.out)
    print(json.dumps(corpus.summary(), indent=2))


if __name__ == "__main__":
    main()
