"""Whole-model build (compiler.build): parity with the PyTorch reference, the cache, bad inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from runtime_helpers import assert_pytorch_parity, built, cache_dir, reference, tiny_gguf, write_tiny

import targets
from compiler import cache
from compiler.build import BuildError, build
from compiler.lower import TERNARY
from runtime.engine import Engine

STEPS = 64
pytestmark = [
    pytest.mark.build,
    pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning"),
]  # tiny shapes: untuned


@pytest.mark.parametrize("n_streams", [1, 2, 4])
def test_tiny_parity_with_pytorch(n_streams):
    """64 teacher-forced steps against PyTorch (prefill over 2 chunks with padding): ``assert_pytorch_parity``."""
    gguf = tiny_gguf(n_streams)
    eng = Engine(built(gguf).dir, gguf)
    prompt = [int(t) for t in np.random.default_rng(n_streams).integers(0, 512, 13)]
    assert_pytorch_parity(eng, reference(gguf), prompt, STEPS)


def test_prefill_chunks_equal_token_by_token_decode():
    gguf = tiny_gguf(2)
    eng = Engine(built(gguf).dir, gguf)
    prompt = [5, 17, 300, 2, 9, 44, 1, 0, 511, 7, 3]
    a = eng.prefill(prompt)
    eng.reset()
    for t in prompt[:-1]:
        eng.decode(t)
    b = eng.decode(prompt[-1])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.skipif(not targets.supported("avx2"), reason="CPU lacks AVX2")
def test_tiny_parity_avx2():
    gguf = tiny_gguf(4)
    r = built(gguf, "avx2")
    assert r.meta["target"] == "avx2"
    assert_pytorch_parity(Engine(r.dir, gguf), reference(gguf), [1, 2, 3, 4, 5], 16)


def test_second_build_compiles_nothing(monkeypatch):
    import tvm

    gguf = tiny_gguf(2)
    first = built(gguf)
    monkeypatch.setattr(tvm, "compile", lambda *a, **k: pytest.fail("a cached build must not compile"))
    again = build(gguf, "auto", cache_dir())
    assert not again.compiled and again.dir == first.dir and again.key == first.key


def test_changed_tuning_record_rebuilds(tmp_path):
    gguf = tiny_gguf(2)
    target = targets.detect()
    logs = tmp_path / "logs"
    shutil.copytree(cache.logs_root() / target, logs / target)
    k0 = cache.cache_key(gguf, target, logs)
    assert k0 == cache.cache_key(gguf, target, cache.logs_root())  # same bytes, same key
    rec = logs / target / "database_tuning_record.json"
    lines = rec.read_text().splitlines()
    rec.write_text("\n".join([*lines, lines[-1]]) + "\n")  # one more (duplicate) record: the logs changed
    r = build(gguf, target, tmp_path / "cache", tuning_logs=logs)
    assert r.compiled and r.key != k0
    assert not build(gguf, target, tmp_path / "cache", tuning_logs=logs).compiled


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    gguf = tiny_gguf(2)
    src = built(gguf)
    d = tmp_path / "cache" / src.dir.name
    shutil.copytree(src.dir, d)
    with open(d / "model.so", "r+b") as f:  # truncated shared object
        f.truncate(1000)
    ok, why = cache.check_entry(d, src.key)
    assert not ok and "model.so" in why
    r = build(gguf, "auto", tmp_path / "cache")
    assert r.compiled and r.dir == d and cache.check_entry(d, src.key)[0]
    (d / "meta.json").write_text("{not json")
    assert "meta.json" in cache.check_entry(d, src.key)[1]
    assert build(gguf, "auto", tmp_path / "cache").compiled
    eng = Engine(d, gguf)
    assert eng.prefill([1, 2, 3]).shape == (512,)


def test_other_architecture_is_a_clear_error(tmp_path):
    good = write_tiny(tmp_path / "ok.gguf")
    bad = tmp_path / "llama.gguf"
    bad.write_bytes(good.read_bytes().replace(b"bitnet-mhc", b"bitnet-mhx"))
    with pytest.raises(BuildError, match="architecture"):
        build(bad, "auto", tmp_path / "cache")


def test_missing_tensor_is_a_clear_error(tmp_path):
    good = write_tiny(tmp_path / "ok.gguf")
    bad = tmp_path / "missing.gguf"
    bad.write_bytes(good.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_uq.weight"))
    with pytest.raises(BuildError, match="ffn_up"):
        build(bad, "auto", tmp_path / "cache")
    with pytest.raises(BuildError, match="no such file"):
        build(tmp_path / "nope.gguf", "auto", tmp_path / "cache")


def test_dump_ir(tmp_path):
    gguf = tiny_gguf(2)
    r = build(gguf, "auto", tmp_path / "cache", dump_ir=tmp_path / "ir")
    assert r.compiled
    text = (tmp_path / "ir" / "lower.relax.py").read_text()
    assert "def decode_b1" in text and "def decode_b16" in text and "def prefill" in text
    assert "call_tir_inplace" in text
    assert (tmp_path / "ir" / "compile.relax.py").exists()
    assert (tmp_path / "ir" / "tir" / "lm_head_1.py").exists() and (tmp_path / "ir" / "tir" / "lm_head_16.py").exists()


@pytest.mark.skipif(not targets.supported("avx512") or "avx512vbmi" not in targets.cpu_flags(),
                    reason="the tl layout's kernel needs AVX-512 VBMI")  # fmt: skip
def test_tl_weights_give_identical_logits():
    """The 1.67-bit build (``weights="tl"``) computes the same integer dot products: logits bit-identical to tile8,
    in prefill (two chunks, padded: ``gemm_i8_tl``) and decode (``gemv_i8_tl``), from fewer weight bytes."""
    gguf = tiny_gguf(2)
    a = built(gguf, "avx512")
    b = build(gguf, "avx512", cache_dir(), weights="tl")
    assert b.meta["weights"] == "tl" and b.key != a.key
    assert any(k.startswith("gemv_i8_tl") for k in b.meta["kernels"])
    assert any(k.startswith("gemm_i8_tl:N=8:") for k in b.meta["kernels"])
    assert not any(k.startswith(("gemv_i8:", "gemm_i8:")) for k in b.meta["kernels"])
    ea, eb = Engine(a.dir, gguf), Engine(b.dir, gguf)
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, 512, 13)]
    np.testing.assert_array_equal(ea.prefill(prompt), eb.prefill(prompt))
    for t in (5, 300, 2, 511):
        np.testing.assert_array_equal(ea.decode(t), eb.decode(t))
    ternary = tuple(f".{t}.weight" for t in TERNARY)
    wa, wb = (sum(np.prod(s) for n, s, _ in r.meta["params"] if n.endswith(ternary)) for r in (a, b))
    assert wb < wa
    assert "avx512vbmi" in b.meta["cpu_flags"] and "avx512vbmi" not in a.meta["cpu_flags"]
    from bench.compare import compare  # the paired A/B decode measurement runs on the two entries

    r = compare(str(a.dir), str(b.dir), rounds=2, tokens=3, check_steps=4)
    assert r["a"]["weights"] == "tile8" and r["b"]["weights"] == "tl" and len(r["b"]["tok_s"]) == 2
    assert r["logits"] == {"steps": 5, "max_abs_diff": 0.0, "identical": 5, "greedy_agree": 5}
    assert r["ratio_b_over_a"] > 0


def test_compare_logits_gap_sees_a_difference():
    """bench.compare's output check on two stand-in engines: B's logits differ from A's by 0.5 on one step, and its
    pick differs there; every other step is bit-identical. A is fed its own picks."""
    from bench.compare import logits_gap

    class Fake:
        def __init__(self, bump_at):
            self.bump_at, self.n, self.fed = bump_at, 0, []

        def reset(self):
            self.n, self.fed = 0, []

        def _logits(self):
            out = np.zeros(8)
            out[(self.n * 3) % 8] = 1.0
            if self.n == self.bump_at:
                out[7 - (self.n * 3) % 8] = 1.5
            self.n += 1
            return out

        def prefill(self, tokens):
            return self._logits()

        def decode(self, tok):
            self.fed.append(tok)
            return self._logits()

    a, b = Fake(-1), Fake(2)
    r = logits_gap(a, b, steps=4)
    assert r == {"steps": 5, "max_abs_diff": 1.5, "identical": 4, "greedy_agree": 4}
    assert a.fed == b.fed == [0, 3, 6, 1]  # both fed A's picks


def test_compare_rejects_a_non_entry(tmp_path):
    from bench.compare import main

    with pytest.raises(SystemExit, match=r"not a compiler\.build cache entry"):
        main([str(tmp_path), str(tmp_path)])


def test_tl_weights_are_cpu_only():
    with pytest.raises(BuildError, match="CPU"):
        build(tiny_gguf(2), "cuda", cache_dir(), weights="tl")
    with pytest.raises(BuildError, match="expected one of"):
        build(tiny_gguf(2), "avx512", cache_dir(), weights="b3")


def test_engine_refuses_an_entry_this_cpu_cannot_run(monkeypatch):
    """An entry records the CPU flags its kernels execute; on a CPU without them the Engine raises (no SIGILL)."""
    import targets.cpu

    r = built(tiny_gguf(2))
    assert r.meta["cpu_flags"] and set(r.meta["cpu_flags"]) <= targets.cpu.cpu_flags()
    monkeypatch.setattr(targets.cpu, "cpu_flags", lambda: frozenset({"sse2"}))
    with pytest.raises(RuntimeError, match="needs the CPU flags"):
        Engine(r.dir, tiny_gguf(2))
