"""``compiler.build --head int8``: the LM head as int8 rows with a float32 scale each (half an F16 head's bytes).

* :func:`compiler.lower.quantize_head` moves every weight by at most half its row's scale, keeps zero rows zero;
* a compiled int8-head model gives the float head's greedy tokens where the float head's top two are further apart
  than the int8 rounding can move them, and logits within the bound that rounding implies
  (``|Δlogit[v]| ≤ scale[v] / 2 · Σ_d |h[d]|``, checked against the float head's own entry);
* the MTP draft steps use the scaled head too, and the head compiles for CUDA inside the one graph per call.

    pytest tests/test_lm_head_int8.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import cache_dir, tiny_gguf

from compiler import cuda_cross
from compiler.build import build
from compiler.lower import quantize_head
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


@pytest.mark.build
def test_int8_head_keeps_the_float_heads_tokens_within_its_rounding():
    gguf = tiny_gguf(1, arch="bitnet", ffn_act="relu2")
    ref = Engine(build(gguf, "auto", cache_dir()).dir, gguf)
    eng = Engine(build(gguf, "auto", cache_dir(), head="int8").dir, gguf)
    assert eng.meta["head"] == "int8" and ["lm_head.weight", [512, 256], "int8"] in eng.meta["params"]
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
    bound = scale / 2 * D * float(np.abs(g.tensors["output_norm.weight"].to_float()).max())
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
