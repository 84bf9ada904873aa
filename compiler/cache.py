"""The compiled-module cache: where a build of (GGUF, target) lives and whether it is complete. No TVM import.

An entry is a directory ``<cache_dir>/<key>/`` holding ``model.so`` (the Relax VM executable), ``params.npz`` (the
packed weights, plain arrays, no pickle) and ``meta.json`` (config, parameter order, kernel sources, and the sha256
of the two other files). ``key`` is the sha256 of the GGUF bytes, the target name, the target's tuning-log bytes and
:data:`COMPILER_VERSION` plus the source of the compiler/schedule modules (an edited kernel rebuilds). The GGUF path
goes through :func:`model.gguf_io.check_model_file` first (a regular file of bounded size with the GGUF magic), so a
directory, ``/dev/zero`` or a FIFO is refused with a ``GGUFError`` instead of being hashed forever.
``meta.json`` is written last, and an entry is used only if its files still hash to what it records; anything else
is a *corrupt* entry that the build replaces.

    python -m compiler.cache --model models/small.gguf --target auto     # prints the key and the entry's state
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

COMPILER_VERSION = "1"
REPO = Path(__file__).resolve().parent.parent
SOURCES = ["compiler/lower.py", "compiler/graph_kernels.py", "compiler/schedule.py", "compiler/build.py",
           "compiler/ops", "schedules"]  # fmt: skip
FILES = ("model.so", "params.npz")


def default_cache_dir() -> Path:
    return Path(os.environ.get("TERNARY_TVM_CACHE", Path.home() / ".cache" / "ternary-tvm"))


def logs_root() -> Path:
    return Path(os.environ.get("TERNARY_TUNING_LOGS", REPO / "tuning_logs"))


def _sha_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    _sha_file(h, Path(path))
    return h.hexdigest()


def source_files() -> list[Path]:
    out = []
    for s in SOURCES:
        p = REPO / s
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
    return out


PER_THREAD_WEIGHTS = ("tl",)  # gemv_i8_tl's per-thread table build: schedules.x86_tl.tasks(op, cores)


def cache_key(gguf: Path | str, target: str, tuning_logs: Path | str | None = None, weights: str = "tile8",
              cores: int | None = None) -> str:  # fmt: skip
    """sha256 of (GGUF bytes, target, weight layout, tuning records of that target, compiler version + sources, and
    for layouts whose kernels split work per thread, the thread count they are built for: ``cores``, None meaning
    :func:`targets.build_cores`). Every other CPU kernel splits over any thread count, so a 2-bit entry
    serves every thread count and is not rebuilt when ``TVM_NUM_THREADS`` changes. Raises
    ``model.gguf_io.GGUFError`` for a path that cannot be a model file (checked before hashing)."""
    import targets
    from model.gguf_io import check_model_file

    h = hashlib.sha256()
    h.update(b"gguf\0")
    _sha_file(h, check_model_file(gguf))
    h.update(f"\0target\0{target}\0version\0{COMPILER_VERSION}\0".encode())
    if weights != "tile8":  # the default keeps the keys of existing entries
        h.update(f"\0weights\0{weights}\0".encode())
    if target != "cuda" and weights in PER_THREAD_WEIGHTS:
        h.update(f"\0cores\0{int(cores or targets.build_cores())}\0".encode())
    d = Path(tuning_logs or logs_root()) / target
    for name in ("database_workload.json", "database_tuning_record.json"):
        h.update(f"\0{name}\0".encode())
        if (d / name).exists():
            _sha_file(h, d / name)
    for p in source_files():
        h.update(f"\0{p.relative_to(REPO)}\0".encode())
        _sha_file(h, p)
    return h.hexdigest()


def entry_dir(cache_dir: Path | str | None, key: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / key[:32]


def check_entry(d: Path, key: str) -> tuple[bool, str]:
    """``(usable, why)``: complete, same key, files hash to the recorded sha256."""
    meta_path = d / "meta.json"
    if not d.exists():
        return False, "absent"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return False, f"corrupt (meta.json: {exc})"
    if meta.get("key") != key:
        return False, "corrupt (key mismatch)"
    for name in FILES:
        p = d / name
        if not p.is_file():
            return False, f"corrupt ({name} missing)"
        if sha256_file(p) != meta.get("sha256", {}).get(name):
            return False, f"corrupt ({name} does not match its recorded sha256)"
    return True, "ok"


def read_meta(d: Path) -> dict:
    return json.loads((d / "meta.json").read_text())


def main(argv=None) -> None:
    from targets import resolve

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    try:
        key = cache_key(a.model, resolve(a.target))
    except ValueError as exc:  # GGUFError (the model file), or an unknown target
        raise SystemExit(f"error: {exc}") from None
    d = entry_dir(a.cache_dir, key)
    print(key, d, check_entry(d, key)[1])


if __name__ == "__main__":
    main()
