"""Hostile model files: every defect of issue 13's file part as a test, and a GGUF mutator under a memory cap.

A file is either refused with a one-line :class:`~model.gguf_io.GGUFError` naming what is wrong, or it is a model
that compiles and runs: never a crash, a hang, an allocation above the cap, or a bad value compiled silently.
The corpus is crafted from a tiny random model; the mutator (hypothesis: byte flips, truncations, header fields
replaced by hostile values — huge counts and lengths, NaN, negative, wrong types) runs in a subprocess limited to
2 GiB of address space (``RLIMIT_AS``) with a time limit per file.

    pytest -q tests/test_gguf_hostile.py                                 # corpus + a bounded fuzz run (CI: 60 files)
    GGUF_FUZZ_EXAMPLES=500 pytest -q tests/test_gguf_hostile.py -k fuzz -s   # ≥ 500 mutated files, prints outcomes
    python tests/test_gguf_hostile.py FILE.gguf 500                      # the mutator alone, on any GGUF
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from model.gguf_io import ARCH, GGUFError, parse_gguf, read_gguf

REPO = Path(__file__).resolve().parent.parent
CAP_BYTES = 2 << 30  # RLIMIT_AS of the fuzz worker
FILE_SECONDS = 20  # one file may take this long in the worker (a tiny file takes ~50 ms)
FUZZ_EXAMPLES = int(os.environ.get("GGUF_FUZZ_EXAMPLES", "60"))


# --- crafting files -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One fixed-width number of a GGUF header: what it is, where it is, its struct format."""

    what: str  # "version", "kv_count", "value:<key>", "vtype:<key>", "count:<key>", "dim:<tensor>", ...
    offset: int
    fmt: str


def header_fields(raw: bytes) -> list[Field]:
    """Every fixed-width field of a (well-formed) GGUF header, walked independently of the reader under test."""
    sizes = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
    out = [Field("version", 4, "<I"), Field("tensor_count", 8, "<Q"), Field("kv_count", 16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    pos = 24

    def string(what: str) -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", raw, pos)[0]
        out.append(Field(f"strlen:{what}", pos, "<Q"))
        pos += 8 + n
        return raw[pos - n : pos].decode()

    for _ in range(n_kv):
        key = string("key")
        vtype = struct.unpack_from("<I", raw, pos)[0]
        out.append(Field(f"vtype:{key}", pos, "<I"))
        pos += 4
        if vtype == 8:
            string(key)
        elif vtype == 9:
            item, count = struct.unpack_from("<IQ", raw, pos)
            out += [Field(f"itemtype:{key}", pos, "<I"), Field(f"count:{key}", pos + 4, "<Q")]
            pos += 12
            for i in range(count):
                if item == 8:
                    n = struct.unpack_from("<Q", raw, pos)[0]
                    if i < 3 or i == count - 1:
                        out.append(Field(f"strlen:{key}[{i}]", pos, "<Q"))
                    pos += 8 + n
                else:
                    pos += struct.calcsize(sizes[item])
        else:
            out.append(Field(f"value:{key}", pos, sizes[vtype]))
            pos += struct.calcsize(sizes[vtype])
    for _ in range(n_tensors):
        name = string("tensor name")
        n_dims = struct.unpack_from("<I", raw, pos)[0]
        out.append(Field(f"ndims:{name}", pos, "<I"))
        pos += 4
        out += [Field(f"dim:{name}[{j}]", pos + 8 * j, "<Q") for j in range(n_dims)]
        pos += 8 * n_dims
        out += [Field(f"ttype:{name}", pos, "<I"), Field(f"toffset:{name}", pos + 4, "<Q")]
        pos += 12
    return out


def set_field(raw: bytes, what: str, value) -> bytes:
    """``raw`` with the header field ``what`` (see :func:`header_fields`) replaced by ``value``, in place."""
    f = next(f for f in header_fields(raw) if f.what == what)
    buf = bytearray(raw)
    struct.pack_into(f.fmt, buf, f.offset, value)
    return bytes(buf)


def rewrite(src: Path, dst: Path, set_keys: dict) -> Path:
    """Copy a GGUF through gguf.GGUFWriter with metadata replaced: ``{key: (value, GGUFValueType[, item type])}``."""
    import gguf

    f = parse_gguf(src)
    w = gguf.GGUFWriter(str(dst), f.metadata["general.architecture"])
    for key, value in f.metadata.items():
        if key == "general.architecture":
            continue
        if key in set_keys:
            value, vt, *sub = set_keys[key]
            w.add_key_value(key, value, vt, sub_type=sub[0] if sub else None)
            continue
        vt = gguf.GGUFValueType(int(f.value_types[key]))
        sub = gguf.GGUFValueType(int(f.array_types[key])) if key in f.array_types else None
        w.add_key_value(key, list(value) if sub is not None else value, vt, sub_type=sub)
    for key, (value, vt, *sub) in set_keys.items():
        if key not in f.metadata:
            w.add_key_value(key, value, vt, sub_type=sub[0] if sub else None)
    for name, t in f.tensors.items():
        w.add_tensor(name, np.array(t.data), raw_dtype=gguf.GGMLQuantizationType(int(t.ggml_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@functools.cache
def tiny_bytes() -> bytes:
    from runtime_helpers import tiny_gguf  # torch: only in the pytest process, never in the capped worker

    return tiny_gguf(2).read_bytes()


@pytest.fixture
def tiny(tmp_path) -> Path:
    p = tmp_path / "tiny.gguf"
    p.write_bytes(tiny_bytes())
    return p


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """A CLI failure as the issue asks: exit status 1 or 2, one line on stderr, no traceback."""
    err = run.stderr.strip()
    assert run.returncode in (1, 2), (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in err, err[-2000:]
    last = err.splitlines()[-1]
    assert last.startswith(("error:", "usage:")) or ": error:" in last, err[-2000:]
    return last


def cli(module: str, *args, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})  # fmt: skip


# --- 1. the config, validated at the reader --------------------------------------------------------------------------

EPS, THETA, CTX = (
    f"value:{ARCH}.{k}" for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "context_length")
)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("what", "value", "message"),
    [(EPS, math.nan, "layer_norm_rms_epsilon"), (EPS, -1.0, "layer_norm_rms_epsilon"),
     (EPS, 0.0, "layer_norm_rms_epsilon"), (EPS, math.inf, "layer_norm_rms_epsilon"),
     (EPS, 1e-45, "layer_norm_rms_epsilon"), ("value:general.file_type", 0, "general.file_type"),
     ("value:general.quantization_version", 7, "general.quantization_version"),
     (THETA, math.nan, "rope.freq_base"), (THETA, math.inf, "rope.freq_base"), (THETA, 0.0, "rope.freq_base"),
     (THETA, -10000.0, "rope.freq_base"),
     (CTX, 3, "context_length"), (CTX, 0, "context_length"), (CTX, 1 << 24, "context_length"),
     (CTX, (1 << 31) - 1, "context_length"), (CTX, (1 << 32) - 1, "context_length"),
     (f"value:{ARCH}.mhc.dynamic", 1, "mhc.dynamic"),
     (f"value:{ARCH}.attention.head_count", 0, "attention.head_count"),
     (f"value:{ARCH}.attention.head_count_kv", 0, "head_count_kv"),
     (f"value:{ARCH}.feed_forward_length", 0, "feed_forward_length"),
     (f"value:{ARCH}.attention.head_count", 256, "attention.head_count")],  # head_dim 1: RoPE needs pairs
)  # fmt: skip
def test_bad_hyperparameters_are_refused_by_name(what, value, message):
    """NaN/negative/zero epsilon and RoPE base, a context too small or too large, an unsupported flag, a zero that
    the config would have silently derived: each a one-line GGUFError naming the GGUF key."""
    bad = set_field(tiny_bytes(), what, value)
    with pytest.raises(GGUFError, match=message) as info:
        read_gguf(bad)
    assert "\n" not in str(info.value)


@pytest.mark.unit
def test_errors_are_one_short_line():
    """A key length that swallows the following bytes puts NULs, newlines and kilobytes into the key the error names:
    the message escapes them and stays short (it was one 4 KB line, or several)."""
    raw = tiny_bytes()
    at = raw.index(b"tokenizer.ggml.tokens") - 8
    for n in range(4000, 4100):  # a length ending on a character boundary: the key is then valid UTF-8
        with pytest.raises(GGUFError) as info:
            read_gguf(set_u64(raw, at, n))
        if "invalid UTF-8" not in str(info.value):
            break
    message = str(info.value)
    assert "tokenizer.ggml.tokens" in message and len(message) < 600, message
    assert message.isprintable(), message


def set_u64(raw: bytes, at: int, value: int) -> bytes:
    buf = bytearray(raw)
    struct.pack_into("<Q", buf, at, value)
    return bytes(buf)


@pytest.mark.unit
def test_context_bounded_by_the_memory_it_implies(monkeypatch):
    """A context under the documented maximum is still refused, with the figure, when the memory its KV cache and
    RoPE tables need exceeds what this machine (or ``TERNARY_TVM_MAX_MEMORY_GIB``) allows."""
    from model.config import MAX_CONTEXT, MEMORY_ENV, memory_estimate

    ok = read_gguf(set_field(tiny_bytes(), CTX, MAX_CONTEXT))
    need = memory_estimate(ok.config)
    assert need["kv_cache"] == 2 * 2 * 2 * MAX_CONTEXT * 64 * 4  # K and V, 2 layers, 2 KV heads, head_dim 64, fp32
    monkeypatch.setenv(MEMORY_ENV, "0.05")
    with pytest.raises(GGUFError, match=r"context_length.*GiB.*KV cache.*0\.05 GiB"):
        read_gguf(set_field(tiny_bytes(), CTX, MAX_CONTEXT))
    read_gguf(tiny_bytes())  # 256 tokens fit


@pytest.mark.unit
def test_tokenizer_merges_must_name_known_tokens(tiny, tmp_path):
    import gguf

    f = parse_gguf(tiny)
    merges = list(f.metadata["tokenizer.ggml.merges"])
    array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    for i, merge in enumerate(["Ġ zzzqqq", "zzz qqq", "Ġ"]):  # unknown right, both unknown, not a pair
        value = [*merges[:5], merge, *merges[5:]]
        bad = rewrite(tiny, tmp_path / f"m{i}.gguf", {"tokenizer.ggml.merges": (value, array, string)})
        with pytest.raises(GGUFError, match="merges"):
            read_gguf(bad)


@pytest.mark.unit
def test_special_token_ids_in_range(tiny, tmp_path):
    import gguf

    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"):
        bad = rewrite(tiny, tmp_path / "t.gguf", {key: (512, gguf.GGUFValueType.UINT32)})
        with pytest.raises(GGUFError, match="outside the vocabulary"):
            read_gguf(bad)


@pytest.mark.build
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")  # tiny shapes: untuned
def test_smallest_context_compiles_and_runs():
    """MIN_CONTEXT is usable: a model with the smallest context the reader takes compiles, prefills over two
    chunks and decodes until its context is full, then refuses one token more."""
    from runtime_helpers import built, tiny_gguf

    from model.config import MIN_CONTEXT
    from runtime.engine import Engine

    gguf = tiny_gguf(2, max_seq_len=MIN_CONTEXT)
    eng = Engine(built(gguf).dir, gguf)
    logits = eng.prefill(list(range(1, 12)))
    while eng.pos < MIN_CONTEXT:
        assert np.isfinite(logits).all()
        logits = eng.decode(int(np.argmax(logits)))
    with pytest.raises(ValueError, match="full"):
        eng.decode(1)


# --- 2. input files: type, size and magic before anything is hashed --------------------------------------------------


def hostile_paths(tmp_path: Path, tiny: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.gguf"
    with open(huge, "wb") as f:  # sparse: costs no disk; its header is a real one
        f.write(tiny.read_bytes()[:4096])
        f.truncate((64 << 30) + 1)
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n" * 100)
    empty = tmp_path / "empty.gguf"
    empty.touch()
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(set_field(tiny.read_bytes(), "version", 2))
    return {"not a regular file": Path("/dev/zero"), "a character device": Path("/dev/null"),
            "a directory": tmp_path, "FIFO": fifo, "no such file": tmp_path / "absent.gguf", "64 GiB": huge,
            "magic": text, "empty": empty, "version 2": v2}  # fmt: skip


@pytest.mark.unit
def test_check_model_file_refuses_without_reading(tmp_path, tiny):
    """/dev/zero, /dev/null, a directory, a FIFO, a missing file, a > 64 GiB file, a wrong magic or version: a
    GGUFError at once (a FIFO with no writer, or /dev/zero, would otherwise block or never end)."""
    from compiler import cache
    from model.gguf_io import check_model_file

    assert check_model_file(tiny) == tiny
    for message, p in hostile_paths(tmp_path, tiny).items():
        t0 = time.perf_counter()
        with pytest.raises(GGUFError, match=message):
            check_model_file(p)
        with pytest.raises(GGUFError, match=message):
            read_gguf(p)
        if message != "no such file":
            with pytest.raises(GGUFError, match=message):
                cache.cache_key(p, "avx2")
        assert time.perf_counter() - t0 < 2, message


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "DIR", "FIFO", "absent.gguf", "notes.gguf"])
def test_build_cli_refuses_hostile_model_paths(tmp_path, tiny, path):
    """``compiler.build --model /dev/zero`` hung hashing an endless file; now every bad path is one line, exit 1."""
    paths = hostile_paths(tmp_path, tiny)
    model = {"DIR": tmp_path, "FIFO": paths["FIFO"], "absent.gguf": tmp_path / "absent.gguf",
             "notes.gguf": paths["magic"]}.get(path, path)  # fmt: skip
    line = one_line_error(cli("compiler.build", "--model", model, "--cache-dir", tmp_path / "cache", timeout=30))
    assert str(model) in line


@pytest.mark.e2e
def test_cache_cli_refuses_dev_zero():
    assert "not a regular file" in one_line_error(cli("compiler.cache", "--model", "/dev/zero", timeout=30))
    assert "unknown target" in one_line_error(cli("compiler.cache", "--model", "models/small.gguf", "--target", "x"))


@pytest.mark.e2e
def test_chat_cli_does_not_hang_on_dev_zero(tmp_path):
    """``runtime.chat --model /dev/zero`` reaches the check through compiler.cache (it hashed /dev/zero forever)."""
    run = cli("runtime.chat", "--model", "/dev/zero", "--cache-dir", tmp_path, "-p", "x", timeout=60)
    assert run.returncode != 0 and "not a regular file" in run.stderr


# --- 3. the compiler.build CLI ----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_build_cli_unwritable_cache_dir_fails_before_compiling(tmp_path, tiny):
    """The cache directory is checked before reading and compiling (it failed after a full compile, with a trace)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = cli("compiler.build", "--model", tiny, "--cache-dir", blocker / "cache", timeout=60)
    assert "cache directory" in one_line_error(run)
    assert "[read]" not in run.stderr and "[compile]" not in run.stderr
    run = cli("compiler.build", "--model", tiny, "--cache-dir", tmp_path / "c", "--dump-ir", blocker, timeout=60)
    assert "--dump-ir" in one_line_error(run) and "[read]" not in run.stderr


@pytest.mark.e2e
def test_build_cli_refuses_tl_weights_without_vbmi(tmp_path, tiny):
    """``--weights tl`` on a CPU without AVX-512 VBMI (hidden here by TERNARY_CPU_MASK) is refused before the model
    is read; it used to read and pack the whole model, then fail with NotImplementedError."""
    mask = {"TERNARY_CPU_MASK": "avx512*,avx_vnni*"}
    for target in ("auto", "avx2", "avx512"):
        t0 = time.perf_counter()
        run = cli("compiler.build", "--model", tiny, "--cache-dir", tmp_path, "--weights", "tl", "--target", target,
                  env=mask)  # fmt: skip
        assert "VBMI" in one_line_error(run) and "[read]" not in run.stderr, target
        assert time.perf_counter() - t0 < 30


@pytest.mark.e2e
def test_build_cli_bad_flags_and_entries(tmp_path, tiny):
    assert "invalid choice" in one_line_error(cli("compiler.build", "--model", tiny, "--target", "avx9"))
    assert "invalid choice" in one_line_error(cli("compiler.build", "--model", tiny, "--weights", "b3"))
    assert "--model" in one_line_error(cli("compiler.build"))
    line = one_line_error(cli("compiler.build", "--model", tiny, "--repack-into", tmp_path))
    assert "not a compiler.build cache entry" in line
    line = one_line_error(cli("compiler.build", "--model", "/dev/zero", "--repack-into", tmp_path))
    assert "not a regular file" in line


# --- 4. the mutator -------------------------------------------------------------------------------------------------

HOSTILE = {
    "<I": [0, 1, 2, 3, 7, 13, 255, 1 << 16, 1 << 24, (1 << 31) - 1, 1 << 31, (1 << 32) - 1],
    "<i": [0, -1, -(1 << 31), (1 << 31) - 1],
    "<Q": [0, 1, 7, 1 << 31, 1 << 32, 1 << 40, 1 << 62, (1 << 64) - 1],
    "<q": [0, -1, -(1 << 63), (1 << 63) - 1],
    "<f": [math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, 1e-45, 1.0, 3.4e38],
    "<d": [math.nan, math.inf, -1.0, 0.0],
    "<B": [0, 1, 2, 255],
    "<b": [0, -1, 127, -128],
    "<H": [0, 65535],
    "<h": [0, -1],
}


def mutations(raw: bytes):
    """A hypothesis strategy of ``(kind, ops)``, hostile edits of ``raw`` (applied by :func:`mutate`) of five kinds:
    hyperparameter and token-id values replaced (semantic checks), any header field replaced (counts, lengths, value
    types, dims, offsets), bit flips in the tensor data, a truncation, or all of these mixed."""
    from hypothesis import strategies as st

    fields = header_fields(raw)
    values = [f for f in fields if f.what.startswith("value:")]
    data_start = max(f.offset for f in fields) + 8

    def replace(draw, pool_of_fields, n):
        out = []
        for _ in range(n):
            f = draw(st.sampled_from(pool_of_fields), label="field")
            lo, hi = {"<I": (0, 2**32 - 1), "<Q": (0, 2**64 - 1)}.get(f.fmt, (0, 0))
            pool = st.sampled_from(HOSTILE[f.fmt])
            out.append(("set", f.what, draw(st.one_of(pool, st.integers(lo, hi)) if hi else pool, label=f.what)))
        return out

    @st.composite
    def edits(draw):
        kind = draw(st.sampled_from(["value", "header", "data", "truncate", "mixed"]), label="kind")
        ops = []
        if kind in ("value", "mixed"):
            ops += replace(draw, values, draw(st.integers(1, 2)))
        if kind in ("header", "mixed"):
            ops += replace(draw, fields, draw(st.integers(1, 3)))
        if kind in ("data", "mixed"):
            for _ in range(draw(st.integers(1, 8), label="flips")):
                ops.append(("flip", draw(st.integers(data_start, len(raw) - 1)), draw(st.integers(0, 7))))
        if kind in ("truncate", "mixed"):
            ops.append(("cut", draw(st.integers(0, len(raw) - 1), label="cut")))
        return kind, tuple(ops)

    return edits()


def mutate(raw: bytes, ops) -> bytes:
    """``raw`` with the edits of :func:`mutations` applied in order."""
    where = {f.what: f for f in header_fields(raw)}
    buf = bytearray(raw)
    for op, a, b in (o if len(o) == 3 else (*o, None) for o in ops):
        if op == "set":
            struct.pack_into(where[a].fmt, buf, where[a].offset, b)
        elif op == "flip":
            buf[a] ^= 1 << b
        else:
            del buf[a:]
    return bytes(buf)


class Hang(BaseException):
    """Raised by SIGALRM in the worker (a BaseException: the reader's ``except`` clauses must not swallow it)."""


def verdict(data: bytes, path: Path) -> str:
    """``error``/``valid`` or raises AssertionError: a valid model must be usable as the build and runtime use it."""
    from compiler.graph_kernels import rope_tables
    from model.config import MAX_CONTEXT, MIN_CONTEXT, memory_estimate, memory_limit
    from model.tokenizer import hf_from_spec

    path.write_bytes(data)
    try:
        g = read_gguf(path)
    except GGUFError as exc:
        assert "\n" not in str(exc), str(exc)
        return "error:" + re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", str(exc).replace(str(path), "FILE")))[:60]
    cfg = g.config  # the values the build would compile, checked the way the build and runtime use them
    assert math.isfinite(cfg.norm_eps) and 1e-12 <= cfg.norm_eps < 1, cfg
    assert math.isfinite(cfg.rope_theta) and cfg.rope_theta > 1, cfg
    assert MIN_CONTEXT <= cfg.max_seq_len <= MAX_CONTEXT and not cfg.mhc_dynamic, cfg
    assert max(memory_estimate(cfg).values()) <= memory_limit(), cfg
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    assert np.isfinite(cos).all() and np.isfinite(sin).all(), cfg
    for c in g.mhc_coefficients():
        assert all(np.isfinite(a).all() for a in (c.h_pre, c.h_post, c.h_res)), cfg
    for t in g.model_tensors().values():
        assert np.isfinite(t.dequantize() if hasattr(t, "dequantize") else t).all()
    hf_from_spec(g.tokenizer)  # what the Engine builds from the file
    return "valid"


def fuzz_worker(src: Path, examples: int, workdir: Path) -> dict:
    """Run in a subprocess: cap the address space, then read ``examples`` mutated files (hypothesis), each under a
    time limit; any other outcome than a one-line GGUFError or a fully valid model fails, naming the edits."""
    from hypothesis import HealthCheck, Phase, given, settings

    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))

    def alarm(*_):
        raise Hang(f"a file took more than {FILE_SECONDS} s")

    signal.signal(signal.SIGALRM, alarm)
    raw = src.read_bytes()
    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    errors: Counter = Counter()
    slowest = [0.0]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=bool(os.environ.get("CI")),
        phases=[Phase.generate],  # no shrinking: a failure names its edits, and the run stays bounded
        suppress_health_check=list(HealthCheck),
    )
    @given(mutant=mutations(raw))
    def one(mutant):
        kind, ops = mutant
        data = mutate(raw, ops)
        t0 = time.perf_counter()
        signal.alarm(FILE_SECONDS)
        try:
            outcome, _, message = verdict(data, workdir / "mutant.gguf").partition(":")
        except (Exception, Hang) as exc:  # a crash, a hang, an allocation above the cap, a bad value accepted
            (workdir / "failing.gguf").write_bytes(data)
            why = f"allocation above the {CAP_BYTES >> 30} GiB cap" if isinstance(exc, MemoryError) else repr(exc)
            raise AssertionError(f"{why[:500]} (kept in {workdir / 'failing.gguf'})") from None
        finally:
            signal.alarm(0)
        outcomes[outcome] += 1
        kinds[f"{kind}:{outcome}"] += 1
        errors[message] += outcome == "error"
        slowest[0] = max(slowest[0], time.perf_counter() - t0)

    one()
    return {"files": sum(outcomes.values()), **outcomes, "slowest_s": round(slowest[0], 3), "by_kind": dict(kinds),
            "errors": dict(errors.most_common(12))}  # fmt: skip


@pytest.mark.unit
def test_every_hostile_value_of_every_metadata_value(tmp_path):
    """Each scalar metadata value (hyperparameters, token ids, file type...) replaced in turn by each hostile value
    of its type: a one-line GGUFError, or a model the build and the runtime can use (see :func:`verdict`)."""
    raw = tiny_bytes()
    outcomes = Counter()
    for f in header_fields(raw):
        if f.what.startswith("value:"):
            for v in HOSTILE[f.fmt]:
                buf = bytearray(raw)
                struct.pack_into(f.fmt, buf, f.offset, v)
                outcomes[verdict(bytes(buf), tmp_path / "m.gguf").partition(":")[0]] += 1
    assert outcomes["error"] > 150 and outcomes["valid"] > 0, outcomes


@pytest.mark.e2e
def test_fuzz_mutated_files_under_a_memory_cap(tmp_path, tiny):
    """Hypothesis-mutated copies of a tiny model, read in a subprocess with 2 GiB of address space: each file is a
    clean GGUFError or a valid model (usable tokenizer, finite RoPE tables and mHC coefficients, in-range config)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__, str(tiny), str(FUZZ_EXAMPLES), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=60 + 2 * FUZZ_EXAMPLES)  # fmt: skip
    assert run.returncode == 0, (run.returncode, run.stdout[-3000:], run.stderr[-6000:])
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    print("fuzz:", stats)
    assert stats["files"] >= min(FUZZ_EXAMPLES, 50) and stats.get("error", 0) > 0, stats


if __name__ == "__main__":  # the fuzz worker: FILE EXAMPLES [WORKDIR]
    src, n = Path(sys.argv[1]), int(sys.argv[2])
    work = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(os.environ.get("TMPDIR", "/tmp"))
    print(json.dumps(fuzz_worker(src, n, work)))
