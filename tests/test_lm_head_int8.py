"""``compiler.build --head int8``: the LM head as int8 rows with a float32 scale each (half an F16 head's bytes).

* :func:`compiler.lower.quantize_head` moves every weight by at most half its row's scale, keeps zero rows zero;
* on AVX-512 the head is integer dots against the hidden row quantized to int8 (``graph_kernels.lm_head_i8``): bit
  for bit ``float32(Σ q·h8) · (scale / a)``, for any batch, head rows and draft vocabulary;
* a compiled int8-head model (each CPU target) gives the float head's greedy tokens where the float head's top two
  are further apart than the int8 rounding can move them, and logits within the bound that rounding implies
  (``|Δlogit[v]| ≤ scale[v] / 2 · Σ_d |h[d]|``, plus ``Σ_d |scale[v]·q[v, d]| · max|h| / 254`` where the hidden row
  is quantized too), checked against the float head's own entry;
* the MTP draft steps use the scaled head too, and the head compiles for CUDA inside the one graph per call;
* the CPU heads' blocked layout (``graph_kernels.tile_head``) is in the entry's parameter list, and
  ``compiler.build --repack-into`` refuses an entry whose layouts differ from this compiler's packing (an entry built
  before the layout changed) instead of writing weights its module would misread.

    pytest tests/test_lm_head_int8.py -q
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import X86
from runtime_helpers import cache_dir, tiny_gguf

import targets
from compiler import cuda_cross
from compiler import graph_kernels as gk
from compiler.build import BuildError, build, repack_into
from compiler.lower import head_step, quantize_head
from model.gguf_io import read_gguf
from model.sampling import SamplingParams
from runtime.engine import Engine

pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
STEPS = 32


@pytest.mark.unit
def test_quantize_head_rounds_each_row_to_its_own_scale():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * rng.uniform(0.001, 0.1, (64, 1))).astype(np.float32)
    w[3] = 0
    q, s = quantize_head(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and q.shape == w.shape and s.shape == (64,)
    assert np.abs(q).max() == 127 and (q[3] == 0).all() and s[3] == 0
    err = np.abs(q.astype(np.float32) * s[:, None] - w)
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.unit
@pytest.mark.skipif(not targets.supported("avx512"), reason=f"lacks {targets.missing_flags('avx512')}")
@settings(max_examples=8, deadline=None)
@given(B=st.sampled_from([1, 2, 3, 4, 8]), V=st.integers(1, 70), chunks=st.integers(1, 5), cut=st.integers(0, 69),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_lm_head_i8_is_exact_integer_dots(B, V, chunks, cut, seed):
    import tvm

    D, R = chunks * gk.HEAD_I8_CHUNK, V - cut % V  # R: the first R head rows (a draft vocabulary), 1..V
    rng = np.random.default_rng(seed)
    E = rng.integers(-127, 128, (V, D), dtype=np.int8)
    h8 = rng.integers(-127, 128, (B, D), dtype=np.int8)
    a = rng.uniform(0.5, 300, B).astype(np.float32)
    s = rng.uniform(1e-4, 0.1, V).astype(np.float32)
    hsum = h8.astype(np.int32).sum(axis=1).astype(np.int32)
    f = tvm.compile(tvm.IRModule({"main": gk.lm_head_i8(B, V, D, R).with_attr("global_symbol", "main")}),
                    target=targets.get_target("avx512"))  # fmt: skip
    out = tvm.runtime.tensor(np.zeros((B, R), np.float32))
    f["main"](*(tvm.runtime.tensor(x) for x in (h8, a, hsum, gk.tile_head(E, gk.HEAD_I8_CHUNK), s)), out)
    acc = h8.astype(np.int64) @ E[:R].astype(np.int64).T
    assert np.array_equal(out.numpy(), acc.astype(np.float32) * (s[None, :R] / a[:, None]))


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
def test_int8_head_keeps_the_float_heads_tokens_within_its_rounding(target):
    gguf = tiny_gguf(1, arch="bitnet", ffn_act="relu2")
    ref = Engine(build(gguf, target, cache_dir()).dir, gguf)
    eng = Engine(build(gguf, target, cache_dir(), head="int8").dir, gguf)
    step = head_step(read_gguf(gguf).config, target, "int8")  # the CPU kernels' blocked layout
    assert eng.meta["head"] == "int8" and ["lm_head.weight", [32, 256 // step, 16, step], "int8"] in eng.meta["params"]
    assert "token_embd.weight" in {n for n, _, _ in eng.meta["params"]}  # an int8 head is not the embedding
    assert "token_embd.weight" not in {n for n, _, _ in ref.meta["params"]}  # tied F16: one copy, the head's
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 512, 9)]
    ref.reset()
    want = [ref.prefill(prompt)]
    for _ in range(STEPS - 1):
        want.append(ref.decode(int(np.argmax(want[-1]))))
    toks = [int(np.argmax(w)) for w in want]
    eng.reset()
    got = [eng.prefill(prompt)] + [eng.decode(t) for t in toks[:-1]]
    # the bound: each weight moves by ≤ scale[v] / 2, so logit v by ≤ scale[v] / 2 · ||h||_1, and after the final
    # RMSNorm h = u / rms(u) · w_norm, so ||h||_1 ≤ max|w_norm| · ||u||_1 / rms(u) ≤ max|w_norm| · √D · √D
    g = read_gguf(gguf)
    head = g.tensors["token_embd.weight"].to_float()
    _, scale = quantize_head(head)
    D = head.shape[1]
    h_max = float(np.abs(g.tensors["output_norm.weight"].to_float()).max()) * np.sqrt(D)  # max|h| ≤ ||h||_2
    bound = scale / 2 * D * h_max / np.sqrt(D)
    if target == "avx512":  # the hidden row quantized too: each h[d] moves by ≤ max|h| / 254
        q, _ = quantize_head(head)
        bound = bound + np.abs(q.astype(np.float32) * scale[:, None]).sum(axis=1) * h_max / 254
    margins, agree = [], 0
    for w, o in zip(want, got, strict=True):
        assert (np.abs(w - o) <= bound).all()
        top2 = np.sort(w)[-2:]
        margins.append(top2[1] - top2[0])
        agree += int(np.argmax(w) == np.argmax(o))
    assert agree >= STEPS - 2, (agree, sorted(margins)[:3])


@pytest.mark.build
def test_int8_head_serves_the_draft_steps():
    gguf = tiny_gguf(2, mtp_heads=2)
    eng = Engine(build(gguf, "auto", cache_dir(), head="int8").dir, gguf, draft_tokens=2)
    plain = Engine(build(gguf, "auto", cache_dir(), head="int8").dir, gguf, draft_tokens=0)
    prompt, params = [5, 17, 3, 99, 42], SamplingParams(max_new_tokens=24)
    assert list(eng.generate_tokens(prompt, params)) == list(plain.generate_tokens(prompt, params))  # greedy: exact


@pytest.mark.build
@pytest.mark.skipif(not cuda_cross.available(), reason="no CUDA toolkit (nvcc + headers) on this machine")
def test_int8_head_builds_for_cuda_in_the_graph(tmp_path):
    r = build(tiny_gguf(1, arch="bitnet", ffn_act="relu2"), "cuda", tmp_path / "cache", head="int8")
    for name, c in r.meta["census"].items():
        assert (c["graphs"], c["kernels_outside"], c["allocations"]) == (1, 0, 0), (name, c)


@pytest.mark.build
def test_repack_into_refuses_an_entry_of_another_head_layout(tmp_path):
    gguf = tiny_gguf(1, arch="bitnet", ffn_act="relu2")
    entry = tmp_path / "entry"
    shutil.copytree(build(gguf, "avx2", cache_dir()).dir, entry)
    repack_into(entry, gguf)  # this compiler's layouts: rewritten
    meta = json.loads((entry / "meta.json").read_text())
    assert ["lm_head.weight", [32, 256 // gk.HEAD_LANES, 16, gk.HEAD_LANES], "float16"] in meta["params"]
    meta["params"] = [[n, [512, 256] if n == "lm_head.weight" else s, d] for n, s, d in meta["params"]]  # rows
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BuildError, match="layouts differ"):
        repack_into(entry, gguf)
