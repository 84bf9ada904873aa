"""The build cache (compiler.cache) and the runtime's JIT policy (runtime.engine.ensure_built).

* The key covers every source file of the packages the build imports: each one edited (a comment appended) changes
  the key, a file outside them (README, runtime/, tests/) does not; the build imports nothing outside them.
* The key also covers the compiler version and the tuning database; ``meta.json`` lists the records the build chose.
* One tuning-log default (``compiler.cache.logs_root``), honouring ``$TERNARY_TUNING_LOGS`` and the installed copy.
* ``--jit-policy on|off|redo|readonly`` through ``ensure_built``, ``runtime.chat`` and ``runtime.serve`` (one tiny
  build, shared with the other runtime tests through ``runtime_helpers.built``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REPO
from runtime_helpers import built, cache_dir, tiny_gguf

import targets
from compiler import build as build_mod
from compiler import cache
from model.files import atomic_dir, sha256_file
from runtime import chat, serve
from runtime.engine import JIT_POLICIES, Engine, JITError, ensure_built

pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")  # tiny shapes: untuned
TARGET = targets.detect()


def copy_trees(dst: Path) -> Path:
    """The packages the key hashes, plus a few files outside them, copied under ``dst`` (a stand-in for REPO)."""
    for tree in cache.SOURCE_TREES:
        if (REPO / tree).is_dir():
            shutil.copytree(REPO / tree, dst / tree, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for extra in ("README.md", "pyproject.toml", "runtime/chat.py", "tests/test_cache.py"):
        (dst / extra).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / extra, dst / extra)
    return dst


def comment(path: Path) -> str:
    return "\n# edited\n" if path.suffix == ".py" else "\n// edited\n"


@pytest.mark.unit
def test_every_source_file_is_in_the_key(tmp_path):
    """Appending a comment to any file of the hashed trees (every .py and C/C++ source of model/, compiler/,
    schedules/, targets/) changes the key; putting it back restores it."""
    root = copy_trees(tmp_path / "repo")
    gguf, logs = tiny_gguf(2), tmp_path / "no-logs"  # the database is tested below; here only the sources
    key = lambda: cache.cache_key(gguf, TARGET, logs, root=root)  # noqa: E731
    base = key()
    files = cache.source_files(root)
    rel = {p.relative_to(root).as_posix() for p in files}
    # the files the hand-kept list used to miss, and the C sources
    for must in ("model/gguf_io.py", "model/mhc_static.py", "compiler/graph_kernels_gpu.py", "compiler/cuda_cross.py",
                 "model/ternary/_scalar_ref.cpp", "compiler/cuda/stub_libcuda.c"):  # fmt: skip
        assert must in rel or not (REPO / must).exists(), must
    assert any(r.startswith("model/ternary/") for r in rel) and any(r.startswith("schedules/") for r in rel)
    if (REPO / "targets").is_dir():
        assert "targets/__init__.py" in rel
    assert rel == {p.relative_to(REPO).as_posix() for p in cache.source_files()}  # same set as the real tree
    for p in files:
        text = p.read_bytes()
        p.write_bytes(text + comment(p).encode())
        assert key() != base, f"editing {p.relative_to(root)} left the cache key unchanged"
        p.write_bytes(text)
    assert key() == base


@pytest.mark.unit
def test_files_outside_the_trees_do_not_change_the_key(tmp_path):
    root = copy_trees(tmp_path / "repo")
    gguf, logs = tiny_gguf(2), cache.logs_root()
    base = cache.cache_key(gguf, TARGET, logs, root=root)
    for extra in ("README.md", "pyproject.toml", "runtime/chat.py", "tests/test_cache.py"):
        with open(root / extra, "a") as f:
            f.write("\n# edited\n")
    (root / "compiler" / "notes.txt").write_text("not a source file")
    (root / "compiler" / "__pycache__").mkdir(exist_ok=True)
    (root / "compiler" / "__pycache__" / "x.py").write_text("# a stray file in a cache directory")
    assert cache.cache_key(gguf, TARGET, logs, root=root) == base


@pytest.mark.unit
def test_added_or_removed_source_changes_the_key(tmp_path):
    root = copy_trees(tmp_path / "repo")
    gguf, logs = tiny_gguf(2), cache.logs_root()
    base = cache.cache_key(gguf, TARGET, logs, root=root)
    new = root / "schedules" / "new_schedule.py"
    new.write_text("X = 1\n")
    added = cache.cache_key(gguf, TARGET, logs, root=root)
    new.rename(root / "schedules" / "renamed.py")  # same bytes, another path
    renamed = cache.cache_key(gguf, TARGET, logs, root=root)
    (root / "schedules" / "renamed.py").unlink()
    assert len({base, added, renamed}) == 3 and cache.cache_key(gguf, TARGET, logs, root=root) == base
    (root / "targets").mkdir(exist_ok=True)  # the leaf package counts whenever it exists
    (root / "targets" / "extra.py").write_text("Y = 2\n")
    assert cache.cache_key(gguf, TARGET, logs, root=root) != base


@pytest.mark.e2e
def test_the_build_imports_only_hashed_sources(tmp_path):
    """A build, stopped at ``tvm.compile`` in a fresh process, has loaded no module of ours outside the trees the key
    hashes (so no imported source can change without changing the key)."""
    code = (
        "import json, sys, tvm\n"
        "class Stop(Exception): pass\n"
        "def stop(*a, **k): raise Stop\n"
        "tvm.compile = stop\n"
        "from compiler.build import build\n"
        f"try: build({str(tiny_gguf(2))!r}, 'auto', {str(tmp_path / 'c')!r})\n"
        "except Stop: pass\n"
        "print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = {Path(f).resolve() for f in json.loads(out.stdout.strip().splitlines()[-1]) if Path(f).is_absolute()}
    ours = {f for f in ours if f.is_relative_to(REPO) and ".venv" not in f.parts and f.suffix == ".py"}
    assert any(f.name == "lower.py" for f in ours)
    hashed = {p.resolve() for p in cache.source_files()}
    assert ours and ours <= hashed, sorted(str(f.relative_to(REPO)) for f in ours - hashed)


@pytest.mark.unit
def test_compiler_version_and_tuning_logs_are_in_the_key(tmp_path, monkeypatch):
    gguf = tiny_gguf(2)
    logs = tmp_path / "logs"
    shutil.copytree(cache.logs_root() / TARGET, logs / TARGET)
    base = cache.cache_key(gguf, TARGET, logs)
    assert base == cache.cache_key(gguf, TARGET, cache.logs_root())  # same bytes, same key
    v = cache.compiler_version()
    assert v.startswith(cache.COMPILER_VERSION + " ") and "apache-tvm=" in v and "apache-tvm-ffi=" in v
    monkeypatch.setattr(cache, "COMPILER_VERSION", cache.COMPILER_VERSION + "x")
    assert cache.cache_key(gguf, TARGET, logs) != base
    monkeypatch.undo()
    real = cache.metadata.version
    monkeypatch.setattr(cache.metadata, "version", lambda d: "9.9" if d == "apache-tvm" else real(d))
    assert cache.cache_key(gguf, TARGET, logs) != base
    monkeypatch.undo()
    with open(logs / TARGET / "database_workload.json", "a") as f:
        f.write("\n")
    assert cache.cache_key(gguf, TARGET, logs) != base


@pytest.mark.unit
def test_one_tuning_log_default(tmp_path, monkeypatch):
    """``$TERNARY_TUNING_LOGS``, else the checkout's tuning_logs/, else the installed package's compiler/tuning_logs;
    compiler.schedule.logs_dir follows it at call time."""
    from compiler import schedule

    monkeypatch.delenv("TERNARY_TUNING_LOGS", raising=False)
    assert cache.logs_root() == REPO / "tuning_logs"
    assert schedule.logs_dir(TARGET) == REPO / "tuning_logs" / TARGET
    monkeypatch.setenv("TERNARY_TUNING_LOGS", str(tmp_path))
    assert cache.logs_root() == tmp_path and schedule.logs_dir("auto") == tmp_path / TARGET
    assert schedule.logs_dir(TARGET, tmp_path / "x") == tmp_path / "x" / TARGET
    monkeypatch.delenv("TERNARY_TUNING_LOGS")
    monkeypatch.setattr(cache, "REPO", tmp_path)  # an installed package: no tuning_logs/ beside the packages
    assert cache.logs_root().resolve() == Path(cache.__file__).resolve().parent / "tuning_logs"


@pytest.mark.build
def test_meta_lists_the_selected_tuning_records():
    from compiler.ops import make_op

    op = make_op("gemv_i8", M=256, K=512)  # a shipped-model workload: the committed logs have records for it
    got = build_mod.selected_records({op.key: "tuned", "rmsnorm_quant:D=256:N=1": "hand"}, TARGET)
    assert list(got) == [op.key] and len(got[op.key]["sha256"]) == 64 and got[op.key]["run_secs"] > 0
    meta = built(tiny_gguf(2)).meta
    assert set(meta["tuning_records"]) == {k for k, s in meta["kernels"].items() if s == "tuned"}
    assert meta["compiler_version"] == cache.compiler_version()


@pytest.mark.unit
def test_file_helpers(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1000)
    import hashlib

    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    final = tmp_path / "d"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError
    assert (final / "a").read_text() == "1" and sorted(x.name for x in tmp_path.iterdir()) == ["d", "f"]
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(x.name for x in final.iterdir()) == ["b"]


# --- the JIT policy --------------------------------------------------------------------------------------------------
@pytest.fixture
def jit(monkeypatch):
    """The tiny model's cache entry (the one real build, shared with the other runtime tests), then
    compiler.build.build replaced: it records its calls and copies that entry into the cache directory it is given
    instead of compiling. ``jit.entry``, ``jit.calls``."""
    gguf = tiny_gguf(2)
    built(gguf)
    entry = ensure_built(gguf, "auto", cache_dir())  # the same entry (rebuilt only if a source changed since)
    meta = cache.read_meta(entry)
    calls = []

    def fake(gguf, target="auto", cache_dir=None, *a, force=False, cores=None, **k):
        calls.append({"cache_dir": cache_dir, "force": force})
        d = Path(cache_dir) / entry.name
        if d != entry:
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(entry, d)
        return build_mod.BuildResult(d, meta["key"], True, meta)

    monkeypatch.setattr(build_mod, "build", fake)
    return SimpleNamespace(entry=entry, calls=calls, gguf=gguf)


@pytest.mark.build
def test_jit_on_reuses_and_off_never_compiles(jit, tmp_path):
    for policy in ("on", "off", "readonly"):  # a usable entry: reused, nothing compiled
        assert ensure_built(jit.gguf, "auto", cache_dir(), jit_policy=policy) == jit.entry
    assert jit.calls == []
    empty = tmp_path / "empty"
    with pytest.raises(JITError, match=r"JIT policy is off.*python -m compiler\.build --model .* --cache-dir") as e:
        ensure_built(jit.gguf, "auto", empty, jit_policy="off")
    assert "absent" in str(e.value) and jit.calls == [] and not empty.exists()
    assert ensure_built(jit.gguf, "auto", empty, jit_policy="on").parent == empty  # absent: compiled into the cache
    assert jit.calls == [{"cache_dir": empty, "force": False}]
    with pytest.raises(ValueError, match="jit_policy"):
        ensure_built(jit.gguf, "auto", empty, jit_policy="sometimes")
    assert JIT_POLICIES == ("on", "off", "redo", "readonly")


@pytest.mark.build
def test_jit_redo_always_compiles(jit):
    d = ensure_built(jit.gguf, "auto", cache_dir(), jit_policy="redo")
    assert d == jit.entry and jit.calls == [{"cache_dir": cache_dir(), "force": True}]


@pytest.mark.build
def test_jit_readonly_never_writes_the_cache(jit, tmp_path):
    ro = tmp_path / "ro"
    d = ensure_built(jit.gguf, "auto", ro, jit_policy="readonly")
    assert not ro.exists() and not d.is_relative_to(ro) and (d / "model.so").is_file()
    assert jit.calls[0]["force"] is False and Path(jit.calls[0]["cache_dir"]).name.startswith("ternary-tvm-jit-")
    eng = Engine(d, jit.gguf)  # the temporary entry loads
    assert eng.prefill([1, 2, 3]).shape == (eng.vocab,)


@pytest.mark.build
def test_from_gguf_passes_the_policy(jit, tmp_path):
    with pytest.raises(JITError):
        Engine.from_gguf(jit.gguf, "auto", tmp_path / "none", None, "off")
    eng = Engine.from_gguf(jit.gguf, "auto", cache_dir(), jit_policy="off")
    assert eng.dir == jit.entry and jit.calls == []


@pytest.mark.build
def test_chat_jit_policy(jit, tmp_path, capsys):
    gguf = str(jit.gguf)
    with pytest.raises(SystemExit) as e:
        chat.main(["--model", gguf, "-p", "x", "--cache-dir", str(tmp_path / "none"), "--jit-policy", "off"])
    assert "python -m compiler.build --model" in str(e.value) and jit.calls == []
    with pytest.raises(SystemExit) as e:
        chat.main(["--model", gguf, "-p", "x", "--jit-policy", "never"])
    assert e.value.code == 2 and "--jit-policy" in capsys.readouterr().err
    chat.main(["--model", gguf, "-p", "def f(x):", "--max-tokens", "4", "--cache-dir", str(cache_dir()),
               "--jit-policy", "off"])  # fmt: skip
    assert capsys.readouterr().out.startswith("def f(x):") and jit.calls == []


@pytest.mark.unit
def test_chat_default_model_is_the_shipped_one():
    assert chat.default_model() == REPO / "models" / "small.gguf" == chat.DEFAULT_MODEL
    assert serve.DEFAULT_MODEL == chat.DEFAULT_MODEL


@pytest.mark.build
def test_serve_jit_policy(jit, tmp_path, monkeypatch):
    gguf = str(jit.gguf)
    with pytest.raises(SystemExit, match=r"error: .*python -m compiler\.build"):  # before it listens
        serve.main(["--model", gguf, "--cache-dir", str(tmp_path / "none"), "--jit-policy", "off"])
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", gguf, "--jit-policy", "sometimes"])
    assert e.value.code == 2
    seen = []
    monkeypatch.setattr(Engine, "from_gguf", classmethod(lambda cls, *a, **k: seen.append(a) or "engine"))
    backend = serve.Backend(serve.ServeConfig(gguf, cache_dir=str(tmp_path), jit_policy="readonly"))
    try:
        assert backend._open() == "engine" and seen[0][-1] == "readonly"
    finally:
        backend.close()
    assert jit.calls == []
