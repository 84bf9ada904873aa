"""The compiled-module cache: where a build of (GGUF, target) lives and whether it is complete. No TVM import.

An entry is a directory ``<cache_dir>/<key>/`` holding ``model.so`` (the Relax VM executable), ``params.npz`` (the
packed weights, plain arrays, no pickle) and ``meta.json`` (config, parameter order, kernel sources, the tuning
records the build selected, and the sha256 of the two other files). :func:`cache_key`, the one place a key is
computed (``compiler.build`` and the runtime's JIT, ``runtime.engine.ensure_built``, both call it), is the sha256 of

* the GGUF bytes, the target name and the weight layout (and, for a layout whose kernels split work per thread, the
  thread count it is built for);
* the compiler version: :data:`COMPILER_VERSION` and the installed TVM distributions' versions
  (:func:`compiler_version`);
* the target's tuning database (both files of ``<tuning logs>/<target>/``, whatever records the build selects from
  them; ``meta.json`` lists the ones it selected) and this CPU kind's own records
  (``<tuning logs>/<target>/machines/<machine id>/``, which a build prefers);
* every source file of the packages the build imports (:data:`SOURCE_TREES`: whole package trees, every ``.py`` and
  C/C++ source, sorted by their paths relative to the root that holds the packages; :func:`source_files`), so an
  edited kernel, layout, GGUF reader or model definition rebuilds and no hand-kept list can go stale.

The GGUF path goes through :func:`model.gguf_io.check_model_file` first (a regular file of bounded size with the GGUF
magic), so a directory, ``/dev/zero`` or a FIFO is refused with a ``GGUFError`` instead of being hashed forever.
``meta.json`` is written last, and an entry is used only if its files still hash to what it records; anything else
is a *corrupt* entry that the build replaces.

The tuning logs are ``$TERNARY_TUNING_LOGS`` if set, else ``tuning_logs/`` of a source checkout, else the copy an
installed package ships as ``compiler/tuning_logs/`` (:func:`logs_root`).

    python -m compiler.cache --model models/small.gguf --target auto     # prints the key and the entry's state
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from importlib import metadata, resources
from pathlib import Path

from model.files import sha256_file
from targets.cpu import machine_id

COMPILER_VERSION = "2"  # bump when the meaning of an entry changes in a way the sources do not show
REPO = Path(__file__).resolve().parent.parent  # the root holding the packages (a checkout, or site-packages)
SOURCE_TREES = ("model", "compiler", "schedules", "targets")  # every package the build imports ("targets": if present)
SOURCE_SUFFIXES = (".py", ".c", ".cc", ".cpp", ".h", ".cu")
TVM_DISTRIBUTIONS = ("apache-tvm", "apache-tvm-ffi")
DB_FILES = ("database_workload.json", "database_tuning_record.json")
FILES = ("model.so", "params.npz")
__all__ = ["cache_key", "check_entry", "entry_dir", "logs_root", "sha256_file", "source_files"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("TERNARY_TVM_CACHE", Path.home() / ".cache" / "ternary-tvm"))


def logs_root() -> Path:
    """The tuning-log root, one directory per target: ``$TERNARY_TUNING_LOGS``, else the checkout's ``tuning_logs/``,
    else the installed package's ``compiler/tuning_logs/`` (setup.py ships it there). The one default; read at call
    time (``compiler.schedule.logs_dir`` uses it too)."""
    env = os.environ.get("TERNARY_TUNING_LOGS")
    if env:
        return Path(env)
    checkout = REPO / "tuning_logs"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("compiler") / "tuning_logs"))


def source_files(root: Path | str | None = None) -> list[Path]:
    """Every source file of :data:`SOURCE_TREES` under ``root`` (default :data:`REPO`), sorted by relative path."""
    root = Path(root or REPO)
    out = []
    for tree in SOURCE_TREES:
        if (root / tree).is_dir():
            out += [p for p in (root / tree).rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()
                    and "__pycache__" not in p.parts]  # fmt: skip
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def compiler_version() -> str:
    """:data:`COMPILER_VERSION` and the versions of the installed TVM distributions (read from their metadata: no
    import), e.g. ``2 apache-tvm=0.27.0.post1 apache-tvm-ffi=0.1.14.post1``."""
    parts = [COMPILER_VERSION]
    for dist in TVM_DISTRIBUTIONS:
        try:
            v = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a TVM built from source: its module may say
            mod = sys.modules.get(dist.replace("apache-", "").replace("-", "_"))
            v = getattr(mod, "__version__", "unknown")
        parts.append(f"{dist}={v}")
    return " ".join(parts)


PER_THREAD_WEIGHTS = ("tl",)  # gemv_i8_tl's per-thread table build: schedules.x86_tl.tasks(op, cores)


def per_thread(target: str, weights: str, amx: bool) -> bool:
    """Whether an entry's kernels are built for a thread count (so one entry per count): the 1.67-bit layout's
    per-thread table build, and the AMX GEMM's tasks (``amx``: :func:`compiler.lower.amx_for`'s result)."""
    return target != "cuda" and (weights in PER_THREAD_WEIGHTS or amx)


def cache_key(gguf: Path | str, target: str, tuning_logs: Path | str | None = None, weights: str = "tile8",
              cores: int | None = None, root: Path | str | None = None, head: str = "auto",
              amx: bool = False) -> str:  # fmt: skip
    """The entry key (see the module docstring): sha256 of the GGUF bytes, target, weight layout, LM head storage
    (``head``: as the GGUF stores it, or int8), whether its GEMMs use AMX (``amx``, resolved by
    :func:`compiler.lower.amx_for`), compiler version,
    the target's tuning database under ``tuning_logs`` (default :func:`logs_root`), every source file under ``root``
    (default :data:`REPO`; :func:`source_files`) and, for layouts whose kernels split work per thread, the thread
    count they are built for: ``cores``, None meaning :func:`targets.build_cores`. Every other CPU kernel
    splits over any thread count, so a 2-bit entry serves every thread count and is not rebuilt when
    ``TVM_NUM_THREADS`` changes. Raises ``model.gguf_io.GGUFError`` for a path that cannot be a model file (checked
    before hashing)."""
    from model.gguf_io import check_model_file

    root = Path(root or REPO)
    h = hashlib.sha256()
    h.update(b"gguf\0")
    sha256_file(check_model_file(gguf), h)
    h.update(f"\0target\0{target}\0version\0{compiler_version()}\0".encode())
    if weights != "tile8":
        h.update(f"\0weights\0{weights}\0".encode())
    if head != "auto":
        h.update(f"\0head\0{head}\0".encode())
    if per_thread(target, weights, amx):
        import targets

        h.update(f"\0cores\0{int(cores or targets.build_cores())}\0".encode())
    if amx:
        h.update(b"\0amx\0")
    d = Path(tuning_logs or logs_root()) / target
    mine = d / "machines" / machine_id()  # this CPU kind's own records (compiler.schedule.find_record)
    for where, db in (("", d), ("machine\0", mine)):
        for name in DB_FILES:
            h.update(f"\0{where}{name}\0".encode())
            if (db / name).exists():
                sha256_file(db / name, h)
    for p in source_files(root):
        h.update(f"\0{p.relative_to(root).as_posix()}\0".encode())
        sha256_file(p, h)
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
