"""train.sandbox: untrusted programs run limited, isolated and classified, and every escape below is refused.

Each escape runs twice where this machine has user namespaces: with every layer ("namespaces") and with the audit
hook, rlimits and process group alone ("hook", what a machine without user namespaces gets), so both configurations
are tested here; without user namespaces the first is skipped.

    pytest -q tests/test_sandbox.py
"""

from __future__ import annotations

import os
import resource
import signal
import time
import uuid
from pathlib import Path

import pytest

from train import sandbox
from train.sandbox import Limits, isolation, run_many, run_program

QUICK = Limits(cpu_s=1.0, wall_s=6.0)
PRINT_CWD = "import os\nprint(os.getcwd(), flush=True)\n"


@pytest.fixture(params=["namespaces", "hook"])
def layers(request, monkeypatch) -> str:
    iso = isolation()
    if request.param == "namespaces" and not iso["user_namespace"]:
        pytest.skip(f"no user namespaces on this machine ({iso['note']})")
    if request.param == "hook":
        off = dict.fromkeys(("user_namespace", "network_namespace", "pid_namespace", "mount_namespace"), False)
        monkeypatch.setattr(sandbox, "_ISOLATION", iso | off)
    return request.param


def survivors(marker: str) -> list[int]:
    """Processes (other than this one) whose command line holds marker: the sandbox's working directory is in the
    command line of every process it starts (unshare, the namespace init, the interpreter's prelude)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def zombies_of_mine() -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                out.append(int(entry))
    return out


def cwd_of(outcome) -> str:
    cwd = outcome.stdout.splitlines()[0]
    assert "sandbox-" in cwd, outcome
    return cwd


# --- ordinary programs ------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_passing_and_failing_programs():
    ok = run_program("print(sum(range(10)))")
    assert (ok.status, ok.returncode, ok.stdout, ok.passed) == ("passed", 0, "45\n", True) and ok.wall_s > 0
    bad = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 3, 'off by one'\n")
    assert (bad.status, bad.returncode, bad.passed) == ("failed", 1, False)
    assert 'File "main.py", line 4' in bad.stderr and "AssertionError: off by one" in bad.stderr
    assert "<string>" not in bad.stderr  # the prelude's frames are not in the candidate's traceback
    assert run_program("import sys\nsys.exit(3)").returncode == 3
    syntax = run_program("def f(:\n    pass\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


@pytest.mark.e2e
def test_legitimate_work_in_the_working_directory(layers):
    src = (
        "import os, pathlib, sqlite3, tempfile\n"
        "open('a.txt', 'w').write('hello')\n"
        "assert open('a.txt').read() == 'hello'\n"
        "os.mkdir('d'); pathlib.Path('d/b.txt').write_text('x')\n"
        "os.rename('d/b.txt', 'd/c.txt'); os.remove('d/c.txt'); os.rmdir('d')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'x'); assert f.name.startswith(os.getcwd())\n"
        "db = sqlite3.connect('db.sqlite'); db.execute('create table t (x)'); db.commit()\n"
        "open('/dev/null', 'w').write('discarded')\n"
        "import subprocess  # importable; only running a process is refused\n"
        "print('ok')\n"
    )
    out = run_program(src)
    assert (out.status, out.stdout) == ("passed", "ok\n"), out.stderr


@pytest.mark.e2e
def test_site_packages_are_importable(layers):
    out = run_program("import numpy as np\nprint(int(np.linalg.matrix_rank(np.eye(4))))")
    assert (out.status, out.stdout) == ("passed", "4\n"), out.stderr
    # numpy's own optional `import ctypes` is refused quietly: a failure after it is "failed", not "blocked"
    caught = run_program("try:\n    import ctypes\nexcept ImportError:\n    pass\nassert False")
    assert caught.status == "failed", caught.stderr


@pytest.mark.e2e
def test_preloaded_libraries_import_but_their_sockets_and_foreign_calls_stay_refused():
    """asyncio imports socket, sympy and scipy import ctypes: a task's module is preloaded before the guard."""
    assert run_program("import asyncio").status == "blocked"
    ok = run_program("import asyncio\nprint(asyncio.iscoroutinefunction(print))", preload=("asyncio",))
    assert (ok.status, ok.stdout) == ("passed", "False\n"), ok.stderr
    gone = run_program(
        "import sys\nassert 'socket' not in sys.modules and 'ctypes' not in sys.modules", preload=("asyncio",)
    )
    assert gone.status == "passed", gone.stderr  # dropped from sys.modules again: a later import is refused
    raw = run_program("import asyncio.base_events as b\nb.socket.socket()", preload=("asyncio",))
    assert raw.status == "blocked", raw
    call = run_program("import ctypes\nctypes.CDLL(None).getpid()", preload=("ctypes",))
    assert call.status == "blocked", call
    bad = run_program("print(1)", preload=("no_such_module_here",))
    assert bad.status == "failed" and "preloading no_such_module_here failed" in bad.stderr
    with pytest.raises(ValueError, match="dotted module names"):
        run_program("print(1)", preload=("os; import socket",))


@pytest.mark.e2e
def test_no_secrets_in_the_environment(layers, monkeypatch):
    monkeypatch.setenv("SANDBOX_SECRET", "hunter2")
    src = (
        "import os\nprint(sorted(os.environ.items()))\n"
        f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept OSError as e:\n    print(e)\n"
    )
    out = run_program(src)
    assert out.status in ("passed", "blocked") and "hunter2" not in out.stdout + out.stderr
    assert "SANDBOX_SECRET" not in out.stdout and "PYTHONPATH" not in out.stdout


# --- limits ---------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_cpu_loop_times_out_and_leaves_nothing(layers):
    out = run_program(PRINT_CWD + "while True:\n    pass\n", QUICK)
    assert out.status == "timeout" and not out.passed
    assert survivors(cwd_of(out)) == [] and zombies_of_mine() == []


@pytest.mark.e2e
def test_wall_clock_kills_a_sleeper_and_leaves_nothing(layers):
    limits = Limits(wall_s=1.0)
    out = run_program(PRINT_CWD + "import time\ntime.sleep(60)\n", limits)
    assert out.status == "timeout" and out.returncode is None
    assert limits.wall_s <= out.wall_s < limits.wall_s + 3.0
    assert survivors(cwd_of(out)) == [] and zombies_of_mine() == []


@pytest.mark.e2e
def test_fork_bomb_is_stopped_and_leaves_nothing(layers):
    out = run_program(PRINT_CWD + "while True:\n    os.fork()\n", QUICK)
    assert out.status == "blocked" and "os.fork" in out.stderr
    assert survivors(cwd_of(out)) == [] and zombies_of_mine() == []


@pytest.mark.e2e
@pytest.mark.parametrize(
    "src",
    [
        "x = bytearray(4 << 30)",
        "xs = []\nwhile True:\n    xs.append(' ' * 10**7)",
        "import numpy as np\nx = np.ones(1 << 31)",
    ],
    ids=["bytearray", "list", "numpy"],
)
def test_memory_bomb(layers, src):
    out = run_program(src, Limits(memory_mb=512))
    assert out.status == "memory", out


@pytest.mark.e2e
def test_output_flood_is_cut_and_costs_the_parent_nothing():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.monotonic()
    out = run_program("import sys\nfor _ in range(100_000):\n    sys.stdout.write('x' * 1000)\n")  # 100 MB
    assert out.status == "output" and out.returncode is None
    assert len(out.stdout) + len(out.stderr) <= Limits().output_bytes
    assert time.monotonic() - t0 < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


@pytest.mark.e2e
def test_file_size_limit():
    out = run_program("open('big', 'wb').write(b'x' * (2 << 20))", Limits(file_bytes=1 << 20))
    assert out.status == "failed" and "File too large" in out.stderr


# --- escapes: each must be refused ----------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "src",
    [
        "import subprocess\nsubprocess.run(['sh', '-c', 'echo escaped'])",
        "import os\nos.system('echo escaped')",
        "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'echo escaped'], {})",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo escaped'])",
        "import pty\npty.fork()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",  # no audit event of its own: stubbed
        "import os\nos.kill(os.getppid(), 9)",
        "import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)",
    ],
    ids=["subprocess", "system", "posix_spawn", "execv", "pty", "fork_exec", "kill", "killpg"],
)
def test_process_creation_and_signals_are_blocked(layers, src):
    out = run_program(src, QUICK)
    assert out.status == "blocked" and "escaped" not in out.stdout, out


@pytest.mark.e2e
@pytest.mark.parametrize(
    "src",
    [
        "open('/tmp/{u}', 'w').write('x')",
        "open('../{u}', 'w').write('x')",
        "import pathlib\npathlib.Path('/tmp/{u}').write_text('x')",
        "import os\nos.open('/tmp/{u}', os.O_WRONLY | os.O_CREAT)",
        "import shutil\nshutil.copy('main.py', '/tmp/{u}')",
        "import os\nos.open('{u}', os.O_WRONLY | os.O_CREAT, dir_fd=os.open('/tmp', os.O_RDONLY))",
        "import os\nos.chdir('/tmp')\nopen('{u}', 'w')",
        "import os\nos.symlink('/tmp/{u}', 'link')\nopen('link', 'w')",
        "import os\nos.mkdir('/tmp/{u}')",
        "import sqlite3\nsqlite3.connect('/tmp/{u}')",
        "open('/dev/zero', 'wb')",
    ],
    ids=["abs", "dotdot", "pathlib", "os.open", "copy", "dir_fd", "chdir", "symlink", "mkdir", "sqlite", "dev"],
)
def test_writes_outside_the_working_directory_are_blocked(layers, src):
    name = f"sandbox-test-{uuid.uuid4().hex}"
    out = run_program(src.format(u=name), QUICK)
    assert out.status == "blocked", out
    assert not Path("/tmp", name).exists()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "src",
    [
        "import os\nos.remove({f!r})",
        "import os\nos.rename({f!r}, 'mine.txt')",
        "import shutil\nshutil.rmtree({d!r})",
        "import os\nos.chmod({f!r}, 0o777)",
        "import os\nos.truncate({f!r}, 0)",
        "import os\nos.link({f!r}, 'hard')\nopen('hard', 'w').write('overwritten')",
    ],
    ids=["remove", "rename", "rmtree", "chmod", "truncate", "hardlink"],
)
def test_deleting_or_changing_files_outside_is_blocked(layers, tmp_path, src):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    out = run_program(src.format(f=str(victim), d=str(tmp_path)), QUICK)
    assert out.status == "blocked", out
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o644


@pytest.mark.e2e
@pytest.mark.parametrize(
    "src",
    [
        "import socket",
        "import ssl",
        "__import__('_socket')",
        "import importlib\nimportlib.import_module('_socket')",
        "import asyncio",
        "import ctypes",
        "import _ctypes",
        "import multiprocessing",
        "import _xxsubinterpreters",
        "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
    ],
    ids=["socket", "ssl", "_socket", "import_module", "asyncio", "ctypes", "_ctypes", "mp", "subinterp", "reimport"],
)
def test_refused_imports(layers, src):
    out = run_program(src, QUICK)
    assert out.status == "blocked" and "SANDBOX-BLOCKED: import" in out.stderr, out


@pytest.mark.e2e
def test_no_socket_module_is_reachable(layers):
    out = run_program("import sys\nprint(sorted(m for m in sys.modules if 'socket' in m or 'ctypes' in m))")
    assert (out.status, out.stdout) == ("passed", "[]\n"), out.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "src",
    [
        "import gc\ngc.get_objects()",
        "import marshal\nmarshal.loads(marshal.dumps(compile('1', 'x', 'eval')))",
        "f = lambda: 1\nf.__code__.replace(co_consts=(2,))",
        "f = lambda: 1\nf.__code__ = (lambda: 2).__code__",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
        "import sys\nsys.addaudithook(lambda *a: None)\nopen('/tmp/x-{u}', 'w')",
    ],
    ids=["gc", "marshal", "code.replace", "__code__", "setrlimit", "second-hook"],
)
def test_the_guard_cannot_be_disarmed(layers, src):
    out = run_program(src.format(u=uuid.uuid4().hex), QUICK)
    assert out.status == "blocked", out


# --- the namespaces, on their own (no audit hook): what stops a program that gets past it -------------------------


@pytest.fixture
def namespaces() -> dict:
    iso = isolation()
    if not iso["mount_namespace"]:
        pytest.skip(f"no user + mount namespaces on this machine ({iso['note']})")
    return iso


@pytest.mark.e2e
def test_namespaces_hold_without_the_hook(namespaces, tmp_path):
    name = f"sandbox-test-{uuid.uuid4().hex}"
    src = (
        "import errno, os, socket\n"
        f"for path in ('/tmp/{name}', '{tmp_path}/{name}', '/dev/{name}'):\n"
        "    try:\n        open(path, 'w')\n    except OSError as e:\n        assert e.errno == errno.EROFS, e\n"
        "    else:\n        raise AssertionError(path)\n"
        "assert [n for _, n in socket.if_nameindex()] == ['lo']\n"
        "s = socket.socket()\ns.settimeout(1)\n"
        "assert s.connect_ex(('1.1.1.1', 53)) != 0\n"
        "assert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1', '2']\n"
        "assert sorted(os.listdir('/dev')) == ['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout',"
        " 'urandom', 'zero']\n"
        "print('contained')\n"
    )
    out = sandbox._run(src, QUICK, guard=False)
    assert (out.status, out.stdout) == ("passed", "contained\n"), out.stderr
    assert not Path("/tmp", name).exists() and not (tmp_path / name).exists()


@pytest.mark.e2e
def test_namespace_kill_reaches_escaped_sessions(namespaces):
    src = PRINT_CWD + (
        "import subprocess, time\n"
        "for _ in range(3):\n"
        "    subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    out = sandbox._run(src, Limits(wall_s=1.5), guard=False)
    assert out.status == "timeout"
    deadline = time.monotonic() + 2.0  # the kernel tears the pid namespace down after its init dies
    while survivors(cwd_of(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert survivors(cwd_of(out)) == [] and zombies_of_mine() == []


# --- run_many, isolation, classification ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_run_many_keeps_order_and_runs_in_parallel():
    src = "import time\nstart = time.time()\ntime.sleep(1.0)\nprint({i}, start, time.time())"
    outs = run_many([src.format(i=i) for i in range(4)], workers=4)
    assert [o.status for o in outs] == ["passed"] * 4
    rows = [o.stdout.split() for o in outs]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert max(float(r[1]) for r in rows) < min(float(r[2]) for r in rows)  # all four were running at once


@pytest.mark.unit
def test_warm_bytecode_compiles_a_preloaded_package_once_and_runs_none_of_it(tmp_path, monkeypatch):
    pkg = tmp_path / "warm_me"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise SystemExit('imported')\n")  # compiling must not run it
    (pkg / "sub" / "mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sandbox, "_WARMED", set())
    assert sandbox.warm_bytecode(["warm_me.sub.mod", "warm_me", "no_such_package_here"], workers=1) == ["warm_me"]
    assert list((pkg / "__pycache__").glob("__init__.*.pyc")) and list((pkg / "sub" / "__pycache__").glob("mod.*.pyc"))
    assert sandbox.warm_bytecode(["warm_me.sub"], workers=1) == []  # once per process


@pytest.mark.e2e
def test_isolation_report_is_cached():
    iso = isolation()
    assert {"user_namespace", "network_namespace", "pid_namespace", "mount_namespace", "audit_hook", "rlimits"} <= set(
        iso
    )
    assert iso == isolation() and iso["audit_hook"] and iso["rlimits"]
    assert not iso["mount_namespace"] or iso["user_namespace"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("reason", "rc", "err", "cpu", "status"),
    [
        (None, 0, "SANDBOX-BLOCKED: import ctypes", 0.1, "passed"),  # a quiet refusal, caught: the exit code rules
        ("output", 1, "", 0.1, "output"),
        ("timeout", 1, "", 0.1, "timeout"),
        (None, -signal.SIGXCPU, "", 2.0, "timeout"),
        (None, -signal.SIGKILL, "", 3.0, "timeout"),  # the hard CPU limit after an ignored SIGXCPU
        (None, -signal.SIGKILL, "", 0.1, "crashed"),
        (None, -signal.SIGSEGV, "MemoryError", 0.1, "memory"),
        (None, -signal.SIGABRT, "std::bad_alloc", 0.1, "memory"),
        (None, -signal.SIGSEGV, "Fatal Python error: Segmentation fault", 0.1, "crashed"),
        (None, 1, "\nSANDBOX-BLOCKED: open /etc/passwd\n", 0.1, "blocked"),
        (None, 1, "\nSANDBOX-MEMORY: MemoryError\n", 0.1, "memory"),
        (None, 1, "AssertionError", 0.1, "failed"),
    ],
)
def test_classify(reason, rc, err, cpu, status):
    assert sandbox._classify(reason, rc, err, cpu, Limits(cpu_s=2.0)) == status
