"""Run untrusted, model-generated Python programs in a throwaway sandbox (execution-based pass@k, RL rewards).

Each candidate runs in its own process, behind layers that do not trust each other:

* **Process**: ``python -I -B`` (isolated mode: no ``PYTHONPATH``, no user site; site-packages stay importable, so a
  task may import numpy) in a fresh working directory, removed afterwards, with a minimal environment (``HOME`` and
  ``TMPDIR`` are the working directory, nothing of the parent's), stdin on ``/dev/null``, its own session. On the
  wall-clock limit, or once stdout + stderr pass ``output_bytes``, it is killed with everything it started; the
  parent never holds more than ``output_bytes`` of it, so a program that prints forever costs the parent nothing.
* **rlimits**, set by the prelude before the candidate's first line (not in a ``preexec_fn``, which is unsafe in
  :func:`run_many`'s threads): CPU, address space, file size, open files, core size 0, processes (which does not bind
  root: the audit hook and the pid namespace are what stop a fork bomb).
* **Audit hook** (PEP 578), installed by the same prelude. It refuses imports of ``socket``, ``ssl``, ``ctypes``,
  ``cffi``, ``multiprocessing``, ``fcntl``, ``readline``, sub-interpreters, the ``_test*`` C modules and a reload of
  ``_posixsubprocess`` (imported first and stubbed: its ``fork_exec`` has no audit event; ``import subprocess`` works,
  ``Popen`` is refused); process creation and signals (``os.fork``, ``os.exec*``, ``os.posix_spawn``, ``os.system``,
  ``subprocess.Popen``, ``os.kill``, ``os.killpg``, ``signal.pthread_kill``); every ``socket.*`` event; writes
  (``open`` in a write mode, remove, rename, mkdir, chmod, chown, link, truncate, utime, xattrs, ``shutil.rmtree``,
  ``sqlite3.connect``) anywhere but the working directory and ``/dev/null``; ``os.symlink`` (a link pointing out
  would make every later path check a guess); ``os.chdir`` out of the working directory; ``os.open`` of a directory
  outside it (its descriptor would carry ``dir_fd`` calls out); reads of another process's ``/proc/<pid>`` and of
  ``.pyc`` files in the working directory; changing rlimits; ``gc.get_objects``-style reach into the hook's own
  objects; building code objects (``code.__new__``, ``marshal.loads`` outside the import system) and replacing a
  function's ``__code__``. A refusal raises ``PermissionError`` and writes ``SANDBOX-BLOCKED: <event> <arg>`` to
  stderr, from which the parent reports ``blocked``. A refused import raises an ``ImportError`` instead and is
  reported only if it ends the program, so that libraries' optional imports (numpy's of ctypes) degrade quietly.
  ``mmap`` stays importable: it maps files the program opened through the checked ``open``, or anonymous memory,
  which the address-space limit bounds, and numpy imports it.
* **Namespaces**, where ``unshare --user --map-root-user`` works (:func:`isolation` probes once): new user, network
  (loopback only), pid (a small init forks the candidate, reaps, reports how it ended) and mount namespaces. In the
  mount namespace the working directory is a fresh tmpfs (``16 × file_bytes``, 4096 inodes), ``/proc`` shows only
  the sandbox's processes, ``/dev`` holds only null, zero, full, random, urandom, and every other mount is read-only,
  so a program that gets past the audit hook still reaches no network and writes nothing on the host. Killing the
  init tears the whole pid namespace down. Without user namespaces the other layers still run, and
  :func:`isolation` says what is missing.

The audit hook alone is not a security boundary (PEP 578 says so): C extensions that do their own I/O
(``torch.save`` to a path), calls without an audit event (``os.mknod``, ``os.mkfifo``, ``os.pidfd_open`` with
``signal.pidfd_send_signal``), hand-made bytecode fed through the import system and interpreter bugs get past it;
the namespaces are what stop those. scipy, sympy and torch import ctypes when they are imported (asyncio imports
socket), so under the hook they do not import (numpy does) unless the caller names them in ``preload``: imported
before the hook is armed, after which their ``ctypes.*`` and ``socket.*`` calls are refused like any.
A program that calls ``sys.exit(0)`` or ``os._exit(0)`` before its checks "passes":
callers print a nonce after the checks and look for it (``train.exec_tasks``).

    python -m train.sandbox --isolation
    python -m train.sandbox prog.py [more.py ...] [--cpu-s 2 --wall-s 6 --memory-mb 1024 --workers 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory", "output", "blocked", "crashed")
BLOCKED_MARK = "SANDBOX-BLOCKED:"
MEMORY_MARK = "SANDBOX-MEMORY:"
SIGNAL_MARK = "SANDBOX-SIGNAL:"
SETUP_MARK = "SANDBOX-SETUP:"
MAX_PROCESSES = 1024  # RLIMIT_NPROC (per user: a fork-bomb ceiling where it binds at all)
READ_CHUNK = 65536
STRAGGLER_S = 0.5  # after the program exits, how long a process it left may hold its pipes before being killed

# imports refused by the audit hook (a dotted name is refused when its first part is here)
BLOCKED_MODULES = frozenset(
    {
        "socket", "_socket", "ssl", "_ssl",  # network (the namespace has none either)
        "ctypes", "_ctypes", "cffi", "_cffi_backend",  # foreign calls and raw memory: the end of every other check
        "multiprocessing", "_multiprocessing", "_posixshmem",  # processes, /dev/shm
        "_posixsubprocess",  # fork_exec has no audit event; the prelude imports it first and stubs it out
        "fcntl",  # ioctl on any descriptor (immutable flags, terminal injection) is not audited
        "readline", "_gdbm", "_dbm",  # C code that writes files without an "open" event
        "_xxsubinterpreters", "_xxinterpchannels",  # a sub-interpreter does not run this interpreter's hooks
    }
)  # fmt: skip
# audit events refused whatever their arguments ("socket.*" and "ctypes.*" as well)
REFUSED_EVENTS = (
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "_posixsubprocess.fork_exec", "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink",
    "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "cpython.PyInterpreterState_New", "code.__new__",
)  # fmt: skip
# audit events whose path arguments must lie in the working directory: event -> ((path index, dir_fd index), ...)
PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "os.chdir": ((0, None),), "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)), "shutil.chown": ((0, None),), "shutil.unpack_archive": ((1, None),),
    "tempfile.mkstemp": ((0, None),), "tempfile.mkdtemp": ((0, None),),
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 2.0  # RLIMIT_CPU (seconds of CPU; SIGXCPU at the next whole second, SIGKILL one later)
    wall_s: float = 6.0  # wall clock; the whole process group / namespace is killed after it
    memory_mb: int = 1024  # RLIMIT_AS
    output_bytes: int = 65536  # stdout+stderr kept; beyond it the process is killed and status "output"
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE (and 16 × it is the working directory's tmpfs, with namespaces)
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class Outcome:
    status: str  # one of STATUSES: passed (exit 0) | failed (non-zero exit) | timeout | memory | output | blocked
    #              (a guard refused an operation) | crashed (killed by a signal)
    returncode: int | None  # exit code, -signal, or None when the sandbox killed it (wall clock, output cap)
    stdout: str  # capped
    stderr: str  # capped, the tail is what matters
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --- the child side: the namespace init (trusted, runs before the candidate) and the prelude ------------------------

# pid 1 of the new namespaces: mount the private /dev, /proc view and read-only tree, then fork the candidate (so
# that it is not an init, which ignores its own default-action signals: SIGXCPU, abort), reap, report its end.
_INIT = r"""
import errno, os, sys
mode, wd, size, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, MOVE = 1, 2, 4, 8, 32, 4096, 8192
KEEP = ((os.ST_NOSUID, NOSUID), (os.ST_NODEV, NODEV), (os.ST_NOEXEC, NOEXEC), (os.ST_NOATIME, 1024),
        (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))


def mounts():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src, dst, fstype=None, flags=0, data=None):
        b = lambda s: None if s is None else os.fsencode(s)
        if libc.mount(b(src), b(dst), b(fstype), ctypes.c_ulong(flags), b(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), dst)

    with open(wd + "/main.py", "rb") as f:
        main = f.read()
    mount("tmpfs", wd, "tmpfs", NOSUID | NODEV, "size=%d,nr_inodes=4096,mode=0755" % size)
    with open(wd + "/main.py", "wb") as f:
        f.write(main)
    stage = wd + "/.dev"
    os.mkdir(stage)
    mount("tmpfs", stage, "tmpfs", NOSUID | NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(stage + "/" + name, "w").close()
        mount("/dev/" + name, stage + "/" + name, None, BIND)
    for name, fd in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink("/proc/self/fd" + fd, stage + "/" + name)
    mount(stage, "/dev", None, MOVE)
    os.rmdir(stage)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    points = [p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
              for p in points]
    for point in points:
        if point == wd:
            continue
        try:
            flags = os.statvfs(point).f_flag
        except OSError:
            continue  # hidden under a later mount (the host's /dev/pts under the new /dev)
        try:
            mount(None, point, None, REMOUNT | BIND | RDONLY | sum(ms for st, ms in KEEP if flags & st))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):  # EINVAL: covered, no longer a mount point here
                raise
    for point in points:  # every mount still reachable is read-only now, the working directory aside
        try:
            writable = point != wd and not os.statvfs(point).f_flag & os.ST_RDONLY
        except OSError:
            continue
        if writable:
            raise RuntimeError("still writable: " + point)


try:
    if mode == "mount":
        mounts()
    os.chdir(wd)
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
except BaseException as e:
    os.write(2, ("\nSANDBOX-SETUP: %r\n" % (e,)).encode())
    os._exit(97)
child = os.fork()
if child == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        os._exit(97)
    if pid == child:
        break
if os.WIFSIGNALED(status):
    os.write(2, b"\nSANDBOX-SIGNAL: %d\n" % os.WTERMSIG(status))
    os._exit(128 + os.WTERMSIG(status))
os._exit(os.waitstatus_to_exitcode(status))
"""

# Runs in the candidate's interpreter before its first line. Everything the hook uses is bound as a positional
# default (an immutable tuple) when it is defined, never looked up in a module the candidate could patch.
_PRELUDE = r"""
import builtins, faulthandler, posix, resource, sys, zipimport, _frozen_importlib_external, _posixsubprocess
for _r, _s, _h in @RLIMITS@:
    _h0 = resource.getrlimit(_r)[1]
    _h = _h if _h0 == resource.RLIM_INFINITY else min(_h, _h0)
    resource.setrlimit(_r, (min(_s, _h), _h))
for _m in @PRELOAD@:  # trusted library modules, imported before the guard is armed (run_program's preload)
    try:
        __import__(_m)
    except BaseException as _e:
        sys.stderr.write("sandbox: preloading %s failed: %r\n" % (_m, _e))
        sys.exit(1)
faulthandler.enable()
_WD = @WD@
sys.argv = ["main.py"]
sys.path.insert(0, _WD)
for _m in list(sys.modules):
    if _m.partition(".")[0] in @BLOCKED@ and _m != "_posixsubprocess":
        del sys.modules[_m]
try:
    with open("main.py", "rb") as _f:
        _code = compile(_f.read(), "main.py", "exec", dont_inherit=True)
except (SyntaxError, ValueError) as _e:
    sys.excepthook(type(_e), _e, None)
    sys.exit(1)


def _no_fork_exec(*args, **kwargs):
    sys.audit("_posixsubprocess.fork_exec")
    raise PermissionError("sandbox: _posixsubprocess.fork_exec refused")


class SandboxRefused(ModuleNotFoundError):
    "An import the sandbox refuses: an ImportError, so that optional imports degrade quietly."


def _norm(path):
    parts = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def _place(p, dfd, _norm=_norm, _cwd=posix.getcwd, _readlink=posix.readlink, _fspath=posix.fspath, _str=str,
           _bytes=bytes, _int=int, _type=type, _Exception=Exception):
    "The absolute, normalized path that p (relative to dir_fd dfd or the cwd) names, or None if it cannot tell."
    t = _type(p)
    if t is _int:
        try:
            return _readlink("/proc/self/fd/%d" % p)
        except OSError:
            return None
    if p is None:
        p = "."
    elif t is not _str and t is not _bytes:
        try:  # only Python-level events (shutil.*) pass path-like objects: the os calls they make are checked again
            p = _fspath(p)
        except _Exception:
            return None
    if _type(p) is _bytes:
        p = p.decode("utf-8", "surrogateescape")
    if _type(p) is not _str:
        return None
    if p[:1] != "/":
        if dfd is None or (_type(dfd) is _int and dfd == -1):
            base = _cwd()
        elif _type(dfd) is _int:
            try:
                base = _readlink("/proc/self/fd/%d" % dfd)
            except OSError:
                return None
        else:
            return None
        p = base + "/" + p
    return _norm(p)


def _guard(event, args, _spec=type(type.__dict__)(@SPEC@), _blocked=@BLOCKED@, _wd=_WD, _wds=_WD + "/",
           _place=_place, _pid=posix.getpid, _stat=posix.stat, _write=posix.write, _frame=sys._getframe,
           _loaders=(_frozen_importlib_external._compile_bytecode.__code__, zipimport._unmarshal_code.__code__),
           _str=str, _bytes=bytes, _int=int, _type=type, _Refused=SandboxRefused, _Perm=PermissionError):
    spec = _spec.get(event)
    if spec is None:
        if event[:7] != "socket." and event[:7] != "ctypes.":
            return
        spec = "refuse"
    a0 = args[0] if args else None
    if _type(a0) is _bytes:
        a0 = a0.decode("utf-8", "surrogateescape")
    detail = a0[:200] if _type(a0) is _str else ("%d" % a0 if _type(a0) is _int else "" if a0 is None else "<object>")
    if not detail.isprintable():
        detail = "<bytes>"
    if spec == "import":
        file = args[1] if _type(args[1]) is _str else ""
        base = file.rpartition("/")[2].partition(".")[0]
        top = a0.partition(".")[0] if _type(a0) is _str else ""
        if (_type(a0) is not _str or top in _blocked or base in _blocked or top[:5] == "_test" or top[:3] == "_xx"
                or base[:5] == "_test"):
            raise _Refused("sandbox: import of %s refused" % detail, name=detail)
        return
    if spec == "marshal":
        code = _frame(1).f_code
        if code is _loaders[0] or code is _loaders[1]:
            return
        detail = "<bytes>"
    elif spec == "setattr":
        if _type(args[1]) is _str and args[1] != "__code__":
            return
        detail = "__code__"
    elif spec != "refuse":
        if spec == "open":
            if _type(a0) is _int:
                return  # wraps a descriptor the program already has: nothing new
            mode, flags = args[1], args[2]
            if _type(flags) is _int:
                write = flags & 0o3003 or flags & 0o100  # O_ACCMODE | O_TRUNC | O_APPEND, O_CREAT
            else:
                write = _type(mode) is not _str or "w" in mode or "a" in mode or "x" in mode or "+" in mode
            checks = ((a0, None, write),)
        elif spec == "sqlite":
            if a0 == ":memory:" or a0 == "" or a0 == b":memory:" or a0 == b"":
                return
            checks = ((None if _type(a0) is _str and a0[:5] == "file:" else a0, None, True),)
        else:
            checks = tuple((args[i], None if d is None else args[d], True) for i, d in spec)
        for p, dfd, write in checks:
            n = _place(p, dfd)
            if n is None:
                if not write:
                    continue  # a path-like object this check cannot read: reading is allowed anyway
                break
            detail = n
            inside = n == _wd or n.startswith(_wds)
            if write:
                if n == "/dev/null":
                    continue
                if not inside:
                    break
                try:
                    kind = _stat(n).st_mode & 0o170000
                except OSError:
                    continue
                if kind == 0o020000 or kind == 0o060000:
                    break  # a device node in the working directory (os.mknod has no audit event)
                continue
            if n[:6] == "/proc/":
                pid = n[6:].partition("/")[0]
                if pid.isdigit() and pid != "%d" % _pid():
                    break  # another process's environment, memory, descriptors
            if inside and n[-4:] == ".pyc":
                break  # hand-made bytecode (-B: no .pyc of the program's own is ever written)
            if args[1] is None and not inside:  # os.open: a directory descriptor outside would let dir_fd
                try:  # calls (whose "open" event carries no dir_fd) write out of the working directory
                    if _stat(n).st_mode & 0o170000 == 0o040000:
                        break
                except OSError:
                    pass
        else:
            return
    msg = "%s %s" % (event, detail)
    try:
        _write(2, b"\nSANDBOX-BLOCKED: " + msg.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass
    raise _Perm("sandbox: %s refused" % msg)


if @GUARD@:
    _posixsubprocess.fork_exec = _no_fork_exec
    sys.addaudithook(_guard)
del _guard, _place, _norm, _no_fork_exec, _f, _r, _s, _h, _h0, _m


def _main(code=_code, refused=SandboxRefused, write=posix.write, exc=BaseException, memory=MemoryError):
    mod = type(sys)("__main__")
    mod.__file__ = _WD + "/main.py"
    mod.__builtins__ = builtins
    sys.modules["__main__"] = mod
    try:
        exec(code, mod.__dict__)
    except SystemExit:
        raise
    except exc as e:
        try:
            sys.excepthook(type(e), e, e.with_traceback(e.__traceback__.tb_next).__traceback__)
        except exc:
            pass
        x, steps = e, 0
        while x is not None and steps < 100:
            if isinstance(x, refused):
                write(2, b"\nSANDBOX-BLOCKED: import " + str(x.name).encode("utf-8", "replace") + b"\n")
                break
            if isinstance(x, memory):
                write(2, b"\nSANDBOX-MEMORY: MemoryError\n")
                break
            x, steps = x.__cause__ or x.__context__, steps + 1
        raise SystemExit(1) from None


_main()
"""

_SPEC = {
    "import": "import",
    "open": "open",
    "sqlite3.connect": "sqlite",
    "object.__setattr__": "setattr",
    "marshal.loads": "marshal",
    "marshal.load": "marshal",
    **dict.fromkeys(REFUSED_EVENTS, "refuse"),
    **PATH_EVENTS,
}

# a program that checks, inside the namespaces, what isolation() reports
_PROBE = r"""
import errno, os, socket, sys
mode, wd = sys.argv[1], sys.argv[2]
assert os.getpid() == 2, os.getpid()
assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
if mode == "mount":
    assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2], os.listdir("/proc")
    with open("/dev/null", "w") as f, open(os.path.join(wd, "probe.txt"), "w") as g:
        f.write("x"), g.write("x")
    for d in ("/", os.path.dirname(wd), "/dev", os.path.dirname(sys.executable)):
        try:
            open(os.path.join(d, "sandbox-probe.txt"), "w")
        except OSError as e:
            assert e.errno == errno.EROFS, (d, e)
        else:
            raise AssertionError(d + " is writable")
"""


def _prelude(wd: str, limits: Limits, guard: bool = True, preload: tuple[str, ...] = ()) -> str:
    cpu = max(1, math.ceil(limits.cpu_s))
    mem, fsize = limits.memory_mb << 20, limits.file_bytes
    rl = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, MAX_PROCESSES, MAX_PROCESSES),
    ]
    if not all(isinstance(m, str) and all(part.isidentifier() for part in m.split(".")) for m in preload):
        raise ValueError(f"preload: dotted module names only, not {preload!r}")
    subs = {"@RLIMITS@": repr(rl), "@WD@": repr(wd), "@BLOCKED@": repr(BLOCKED_MODULES), "@SPEC@": repr(_SPEC),
            "@PRELOAD@": repr(tuple(preload))}  # fmt: skip
    text = _PRELUDE.replace("@GUARD@", repr(bool(guard)))
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


# --- isolation: probed once -----------------------------------------------------------------------------------------

_ISOLATION: dict | None = None
_LOCK = threading.Lock()
_NS_FLAGS = ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]


def _env(wd: str) -> dict[str, str]:
    threads = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": wd, "TMPDIR": wd, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    return base | dict.fromkeys(threads, "1")  # one BLAS thread: a candidate is one of many running at once


def _ns_command(unshare: str, mode: str, wd: str, tmpfs_bytes: int, inner: list[str]) -> list[str]:
    flags = _NS_FLAGS + (["--mount", "--mount-proc"] if mode == "mount" else [])
    init = [sys.executable, "-I", "-S", "-B", "-c", _INIT, mode, wd, str(tmpfs_bytes)]
    return [unshare, *flags, *init, *inner]


def _probe() -> dict:
    info = {
        "user_namespace": False,
        "network_namespace": False,
        "pid_namespace": False,
        "mount_namespace": False,  # private /proc and /dev, tmpfs working directory, the rest read-only
        "audit_hook": True,
        "rlimits": True,
        "unshare": shutil.which("unshare") if sys.platform == "linux" else None,
        "note": "",
    }
    if info["unshare"] is None:
        info["note"] = "no unshare binary (util-linux) on PATH"
        return info
    notes = []
    for mode in ("mount", "plain"):
        with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
            wd = os.path.realpath(tmp)
            Path(wd, "main.py").write_text("")
            inner = [sys.executable, "-I", "-S", "-B", "-c", _PROBE, mode, wd]
            try:
                r = subprocess.run(_ns_command(info["unshare"], mode, wd, 1 << 20, inner), cwd=wd, env=_env(wd),
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)  # fmt: skip
                ok, why = r.returncode == 0, r.stderr.decode(errors="replace").strip()[-300:]
            except (OSError, subprocess.TimeoutExpired) as e:
                ok, why = False, repr(e)
        if ok:
            info.update(user_namespace=True, network_namespace=True, pid_namespace=True)
            info["mount_namespace"] = mode == "mount"
            break
        notes.append(f"{mode}: {why or 'failed'}")
    info["note"] = "; ".join(notes)
    return info


def isolation() -> dict:
    """What this machine gives the sandbox (probed once, cached): namespaces, audit hook, rlimits, and why not."""
    global _ISOLATION
    with _LOCK:
        if _ISOLATION is None:
            _ISOLATION = _probe()
        return dict(_ISOLATION)


# --- the parent side --------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def _exited(pid: int) -> bool:
    """Whether pid has ended, without reaping it (its pid, hence its process group id, stays taken until then)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill(proc: subprocess.Popen) -> None:
    """Kill the namespace's init first (so that unshare reaps it and nothing is handed to the host's init), then the
    whole process group; the leader stays unreaped until _reap, so the group id cannot have been reused."""
    kids = [] if _exited(proc.pid) else _children(proc.pid)
    for child in kids:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
    end = time.monotonic() + 1.0
    while kids and not _exited(proc.pid) and time.monotonic() < end:
        time.sleep(0.005)
    for kill, target in ((os.killpg, proc.pid), (os.kill, proc.pid)):
        try:
            kill(target, signal.SIGKILL)
        except OSError:
            pass


def _reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap the leader: (exit code or -signal, CPU seconds of it and every descendant it reaped)."""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime


def _watch(proc: subprocess.Popen, limits: Limits, deadline: float) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr (at most output_bytes between them) until the program ends, overflows or runs out of
    time; returns (stdout, stderr, "output" | "timeout" | None)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total, reason, ended = 0, None, None
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    try:
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while reason is None:
            now = time.monotonic()
            if ended is None and _exited(proc.pid):
                ended = now
                if pidfd is not None:
                    sel.unregister(pidfd)
            open_fds = [fd for fd in bufs if fd in sel.get_map()]
            if ended is not None and (not open_fds or now - ended > STRAGGLER_S):
                break
            if now >= deadline:
                reason = "timeout"
                break
            wait = deadline - now
            if ended is not None:
                wait = min(wait, STRAGGLER_S - (now - ended))
            elif pidfd is None:
                wait = min(wait, 0.05)
            for key, _ in sel.select(max(wait, 0.0)):
                if key.fd == pidfd:
                    continue
                chunk = os.read(key.fd, READ_CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = limits.output_bytes - total
                bufs[key.fd] += chunk[: max(room, 0)]
                total += len(chunk)
                if total > limits.output_bytes:
                    reason = "output"
                    break
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), reason


def _memory_hint(err: str) -> bool:
    tail = err[-4096:]
    return MEMORY_MARK in err or any(
        s in tail for s in ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
    )


def _classify(reason: str | None, rc: int, err: str, cpu_s: float, limits: Limits) -> str:
    if reason is not None:
        return reason
    if rc == 0:
        return "passed"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits.cpu_s):
            return "timeout"  # SIGKILL: the hard CPU limit, one second after an ignored SIGXCPU
        return "memory" if _memory_hint(err) else "crashed"
    if BLOCKED_MARK in err:
        return "blocked"
    return "memory" if _memory_hint(err) else "failed"


def _run(source: str, limits: Limits, guard: bool = True, preload: tuple[str, ...] = ()) -> Outcome:
    iso = isolation()
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp:
        wd = os.path.realpath(tmp)
        Path(wd, "main.py").write_bytes(source.encode("utf-8", "replace"))
        inner = [sys.executable, "-I", "-B", "-c", _prelude(wd, limits, guard, preload)]
        ns = iso["user_namespace"]
        if ns:
            mode = "mount" if iso["mount_namespace"] else "plain"
            argv = _ns_command(iso["unshare"], mode, wd, max(16 * limits.file_bytes, 1 << 20), inner)
        else:
            argv = inner
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=wd, env=_env(wd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            try:
                resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))  # unshare re-raises the child's signal
            except OSError:
                pass
            out, err, reason = _watch(proc, limits, start + limits.wall_s)
        finally:
            _kill(proc)
            rc, cpu = _reap(proc)
            proc.stdout.close()
            proc.stderr.close()
        wall = time.monotonic() - start
    if ns and rc == 97 and err.lstrip().startswith(SETUP_MARK.encode()):
        raise RuntimeError(f"sandbox setup failed: {err.decode(errors='replace').strip()}")
    mark = b"\n%s %d\n" % (SIGNAL_MARK.encode(), rc - 128)
    if ns and rc > 128 and err.endswith(mark):  # the init's report of a candidate killed by a signal
        rc, err = 128 - rc, err[: -len(mark)]
    text = err.decode("utf-8", "replace")
    status = _classify(reason, rc, text, cpu, limits)
    return Outcome(status, None if reason else rc, out.decode("utf-8", "replace"), text, wall)


def run_program(source: str, limits: Limits = Limits(), preload: tuple[str, ...] = ()) -> Outcome:
    """Run one program (the text of a Python file) in a fresh sandbox and report how it ended.

    ``preload``: installed modules imported inside the sandbox (limits and namespaces in force) *before* the guard is
    armed, so a check may use a library that imports ``ctypes`` or ``socket`` at import time (scipy, sympy, asyncio);
    the program can then reach those modules, but every ``ctypes.*`` and ``socket.*`` event stays refused. The names
    are the caller's (a task's module), never the program's; a preload that fails to import fails the program."""
    return _run(source, limits, preload=tuple(preload))


_WARMED: set[str] = set()


def warm_bytecode(modules, workers: int = 0) -> list[str]:
    """Compile the bytecode of the installed top-level packages of ``modules`` (``compileall``), once per process;
    returns the packages compiled now. The sandbox runs ``python -B``, which never writes bytecode, so a package
    installed without it (one GPU host's sympy) is compiled from source by every sandbox that imports it
    (docs/train/rl, second round). Compiling runs none of the package's code; where its folder cannot be written,
    nothing changes and the sandboxes compile as before. The compiling runs in a child process (``python -m
    compileall``): its worker pool must not fork this one, which may hold threads (PyTorch, tokenizers)."""
    import importlib.util

    done = []
    for top in sorted({m.split(".")[0] for m in modules if m} - _WARMED):
        _WARMED.add(top)
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        folders = [f for f in (spec.submodule_search_locations or []) if os.access(f, os.W_OK)] if spec else []
        if folders:
            argv = [sys.executable, "-m", "compileall", "-q", "-j", str(workers or os.cpu_count() or 1), *folders]
            quiet = subprocess.DEVNULL
            try:
                subprocess.run(argv, timeout=600, stdin=quiet, stdout=quiet, stderr=quiet)
            except subprocess.TimeoutExpired:  # the sandboxes compile what is left, as without this
                continue
            done.append(top)
    return done


def run_many(sources: list[str], limits: Limits = Limits(), workers: int = 0,
             preloads: list[tuple[str, ...]] | None = None) -> list[Outcome]:  # fmt: skip
    """Run programs in parallel (a thread per running sandbox; workers=0: one per core); outcomes in input order.
    ``preloads``: one :func:`run_program` ``preload`` per program (their packages' bytecode is compiled first:
    :func:`warm_bytecode`)."""
    isolation()  # probe before the threads start
    warm_bytecode({m for p in preloads or () for m in p}, workers)
    workers = workers or os.cpu_count() or 1
    jobs = list(zip(sources, preloads if preloads is not None else [()] * len(sources), strict=True))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
        return list(pool.map(lambda job: run_program(job[0], limits, job[1]), jobs))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.sandbox", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="Python programs to run, each in its own sandbox")
    ap.add_argument("--isolation", action="store_true", help="print what this machine gives the sandbox")
    d = Limits()
    ap.add_argument("--cpu-s", type=float, default=d.cpu_s)
    ap.add_argument("--wall-s", type=float, default=d.wall_s)
    ap.add_argument("--memory-mb", type=int, default=d.memory_mb)
    ap.add_argument("--workers", type=int, default=0, help="sandboxes at once (0: one per core)")
    args = ap.parse_args(argv)
    if args.isolation or not args.files:
        print(json.dumps(isolation(), indent=2))
    limits = Limits(cpu_s=args.cpu_s, wall_s=args.wall_s, memory_mb=args.memory_mb)
    outcomes = run_many([p.read_text() for p in args.files], limits, args.workers)
    for path, o in zip(args.files, outcomes, strict=True):
        print(f"{path}: {o.status} (returncode {o.returncode}, {o.wall_s:.2f} s)")
        if not o.passed and o.stderr.strip():
            print("    " + "\n    ".join(o.stderr.strip().splitlines()[-5:]))
    if any(not o.passed for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
