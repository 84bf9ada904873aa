"""model.exact_reference: the compiled CPU graph's arithmetic in numpy, and what it explains about PyTorch's gap.

* every kernel of the CPU graph == its numpy mirror, bit for bit, on avx512 and avx2 (where this CPU runs them);
* the compiled runtime == the exact reference on random ``tiny`` models (n = 1, 2, 4 streams) and on the shipped
  model: the same greedy tokens for 64 steps and logits within 1e-3 (measured: 0, bit-identical);
* the plain PyTorch reference differs from both by the same ~0.1 once an int8 activation rounds the other way: every
  differing int8 value is off by exactly 1, and before the first one the logits agree to float32 noise.

    pytest tests/test_exact_reference.py -q
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import REPO
from kernel_helpers import X86
from runtime_helpers import built, one_torch_thread, reference, tiny_gguf

import targets
from compiler import graph_kernels as gk
from compiler.arith import arith_of, norm_lanes
from compiler.constants import KV_BLOCK
from compiler.ops import make_op
from compiler.schedule import get_primfunc
from model import exact_reference as er
from model.bitlinear import activation_scale
from model.gguf_io import read_gguf
from model.ternary.layouts import pack_rowmajor4
from model.ternary.reference import ternary_matmul_i8
from runtime.engine import Engine
from targets import get_target

STEPS = 64
SHIPPED = REPO / "models" / "small.gguf"
pytestmark = pytest.mark.filterwarnings("ignore::compiler.schedule.UntunedWarning")
F32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# kernel by kernel
# ---------------------------------------------------------------------------------------------------------------
def _kernel_cases(target: str, rng) -> list:
    """``(name, primfunc, inputs, output specs, expected outputs)`` for every kernel kind of the CPU graph."""
    T, D, F, H, Hkv, hd, C = 3, 512, 1536, 4, 2, 64, 64
    cases = []
    for S in (1, 2, 4):
        x, h = rng.standard_normal((T, D)).astype(F32), rng.uniform(0, 1, S).astype(F32)
        cases.append((f"pre_expand_S{S}", gk.pre_expand(T, D, S), [x, h], [((T, D), "float32")],
                      [er.fma_chain([(h[s], x) for s in range(S)])]))  # fmt: skip
    x = (rng.standard_normal((T, F)) * 3).astype(F32)
    r = er.quantize(x)
    cases.append(("quantize", gk.quantize(T, F), [x], [((T, F), "int8"), ((T,), "float32"), ((T,), "int32")],
                  [r.q, r.scale, r.total]))  # fmt: skip
    g, u = (rng.standard_normal((T, F)) * 4).astype(F32), rng.standard_normal((T, F)).astype(F32)
    silu = gk.schedule(gk.silu_mul(T, F), None)  # as the CPU build schedules it
    cases.append(("silu_mul", silu, [g, u], [((T, F), "float32")], [er.silu_mul(g, u)]))
    cos, sin = gk.rope_tables(hd, C, 10000.0)
    pos = np.array([5 + t for t in range(T)], np.int32)
    q = rng.standard_normal((T, H * hd)).astype(F32)
    want = np.stack([er.rope(q[t].reshape(H, hd), cos[5 + t], sin[5 + t]) for t in range(T)])
    cases.append(("rope_q", gk.rope_q(T, H, hd, C), [q, pos, cos, sin], [((T, H, hd), "float32")], [want]))
    kc, vc = (rng.standard_normal((Hkv, C, hd)).astype(F32) for _ in range(2))
    # the paged cache: the dense rows scattered over shuffled blocks (two spare), read through one table per row
    blk = KV_BLOCK
    width = gk.table_width(C, blk)
    order = rng.permutation(width + 2)[:width].astype(np.int32)
    paged = [np.zeros((width + 2, Hkv, blk, hd), F32) for _ in range(2)]
    for j in range(width):
        for dense, pg in zip((kc, vc), paged, strict=True):
            pg[order[j]] = dense[:, j * blk : (j + 1) * blk]
    apos = np.array([5, 40, -1], np.int32)  # the last row is padding: zeros
    o = np.stack([er.attention(want[0], kc, vc, 6), er.attention(want[1], kc, vc, 41), np.zeros(H * hd, F32)])
    cases.append(
        (
            "attention",
            gk.attention(T, H, Hkv, hd, C, blk),
            [want, *paged, apos, np.broadcast_to(order, (T, width))],
            [((T, H * hd), "float32"), ((T * H, C), "float32"), ((T * H, 2), "float32")],
            [o, None, None],
        )
    )
    w = rng.uniform(0.5, 1.5, D).astype(F32)
    x = (rng.standard_normal((T, D)) * 2).astype(F32)
    cases.append(("rmsnorm", gk.rmsnorm(T, D, 1e-5), [x, w], [((T, D), "float32")], [er.rmsnorm(x, w, 1e-5)]))
    for dt in ("float32", "float16"):
        E, hv = rng.standard_normal((256, D)).astype(dt), rng.standard_normal((T, D)).astype(F32)
        Eb = gk.tile_head(E, gk.HEAD_LANES)  # the CPU kernels' blocked layout
        for B in (1, T):  # a row's logits do not depend on the batch
            cases.append((f"lm_head_{dt}_{B}", gk.lm_head(B, 256, D, dt), [hv[:B], Eb], [((B, 256), "float32")],
                          [np.stack([er.lm_head(hv[b], E, gk.HEAD_LANES) for b in range(B)])]))  # fmt: skip
        # the MTP heads' draft vocabulary: the first 96 head rows, three draft rows tiled together
        cases.append((f"lm_head_{dt}_rows96", gk.lm_head(3, 256, D, dt, rows=96), [hv[:3], Eb], [((3, 96), "float32")],
                      [np.stack([er.lm_head(hv[b], E[:96], gk.HEAD_LANES) for b in range(3)])]))  # fmt: skip
        # a vocabulary that is not a multiple of the 16-row block: the last block zero-padded, tiles of 2 rows
        E70 = E[:70]
        cases.append((f"lm_head_{dt}_V70", gk.lm_head(1, 70, D, dt), [hv[:1], gk.tile_head(E70, gk.HEAD_LANES)],
                      [((1, 70), "float32")], [er.lm_head(hv[0], E70, gk.HEAD_LANES)[None]]))  # fmt: skip
        # a tied embedding's rows gathered from the blocked head (ids out of range clipped, as take's mode="clip")
        ids = np.array([0, 69, 17, -3, 70, 1 << 30, 33], np.int32)
        for step in (gk.HEAD_LANES, gk.HEAD_I8_CHUNK):
            got = [gk.tile_head(E70, step), ids]
            cases.append((f"embed_blocked_{dt}_{step}", gk.embed_blocked(len(ids), 70, D, step, dt), got,
                          [((len(ids), D), dt)], [E70[np.clip(ids, 0, 69)]]))  # fmt: skip
    for N in (1, 8):  # the shipped model's width: tuned records, whose lane knob compiler.arith reads
        op = make_op("rmsnorm_quant", D=D, N=N)
        x = (rng.standard_normal((N, D)) * 3).astype(F32)
        r = er.rmsnorm_quant(x, w, norm_lanes(D, N, target))
        cases.append((f"rmsnorm_quant_N{N}", get_primfunc(op, target).func, [x, w],
                      [((N, D), "int8"), ((N,), "float32"), ((N,), "int32")], [r.q, r.scale, r.total]))  # fmt: skip
    for S in (1, 2, 4):
        for first, last in ((0, 0), (1, 0), (0, 1)):
            cases += _mhc_cases(target, rng, T, D, S, first, last)
    return cases


def _mhc_cases(target, rng, T, D, S, first, last) -> list:
    """The decode ``mhc_post`` (tuned op) and the prefill ``mhc_post_tokens`` of one site position."""
    op = make_op("mhc_post", D=D, S=S, first=first, last=last)
    ins = op.random_inputs(rng)
    h_pre = np.full(S, 1.0 / S, F32) if last else ins[4]

    def site(X, y):
        Xp = er.mhc_mix(np.broadcast_to(X, (S, D)) if first else X, y, *ins[2:4])
        return ([] if last else [Xp]) + [er.mhc_aggregate(Xp, h_pre)]

    name = f"S{S}_f{first}_l{last}"
    out = [(f"mhc_post_{name}", get_primfunc(op, target).func, ins, [(a.shape, a.dtype) for a in op.outputs()],
            [*site(ins[0], ins[1]), None])]  # fmt: skip
    X, y = rng.standard_normal((T, D) if first else (T, S, D)).astype(F32), rng.standard_normal((T, D)).astype(F32)
    rows = [site(X[t], y[t]) for t in range(T)]
    want = [np.stack([r[i] for r in rows]) for i in range(len(rows[0]))]
    specs = ([] if last else [((T, S, D), "float32")]) + [((T, D), "float32")]
    return [*out, (f"mhc_post_tokens_{name}", gk.mhc_post_tokens(T, D, S, bool(first), bool(last)),
                   [X, y, *ins[2:]], specs, want)]  # fmt: skip


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
def test_every_kernel_is_bit_exact_with_its_mirror(target):
    import tvm

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = _kernel_cases(target, rng)
    mod = tvm.IRModule({c[0]: c[1].with_attr("global_symbol", c[0]) for c in cases})
    ex = tvm.compile(mod, target=get_target(target))
    for name, _, ins, outs, want in cases:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in ins]
        res = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in outs]
        ex[name](*args, *res)
        for i, (got, w) in enumerate(zip(res, want, strict=True)):
            if w is not None:
                np.testing.assert_array_equal(got.numpy(), w, err_msg=f"{target} {name} output {i}")


@pytest.mark.unit
def test_exact_fma_and_expf():
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal(10_000).astype(F32) for _ in range(3))
    exact = (a.astype(np.float64) * b + c).astype(F32)  # the product is exact in float64: one rounding
    np.testing.assert_array_equal(er.fma(a, b, c), exact)
    assert (er.fma(a, b, c) != (a * b + c).astype(F32)).any()  # ...which the two-rounding float32 form is not
    x = (rng.standard_normal(20_000) * 10).astype(F32)
    libm = er._libm_expf()
    np.testing.assert_array_equal(er.expf(x), np.array([libm(float(v)) for v in x], F32))


@pytest.mark.unit
def test_matmul_is_the_integer_path():
    rng = np.random.default_rng(2)
    codes = rng.integers(-1, 2, (96, 512)).astype(np.int8)
    a = er.quantize((rng.standard_normal((4, 512)) * 5).astype(F32))
    ws = F32(0.0371)
    _, y = ternary_matmul_i8(pack_rowmajor4(codes), a.q, a.scale, float(ws))
    np.testing.assert_array_equal(er.matmul(a, codes.astype(F32), ws), y)


# ---------------------------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------------------------
def exact_parity(engine, ref: er.ExactReference, prompt: list[int], steps: int):
    """Greedy with the exact reference, the engine teacher-forced on its tokens: (ref tokens, engine tokens, max
    |Δlogits| per step)."""
    engine.reset()
    ref.reset()
    want, got = ref.prefill(prompt), engine.prefill(prompt)
    toks, mine, errs = [], [], []
    for _ in range(steps):
        toks.append(int(np.argmax(want)))
        mine.append(int(np.argmax(got)))
        errs.append(float(np.abs(want - got).max()))
        if len(toks) < steps:
            want, got = ref.decode(toks[-1]), engine.decode(toks[-1])
    return toks, mine, errs


def _exact(gguf, target) -> er.ExactReference:
    g = read_gguf(gguf)
    return er.ExactReference(g, arith_of(g.config, target))


@pytest.mark.build
@pytest.mark.parametrize("target", X86)
@pytest.mark.parametrize("n_streams", [1, 2, 4])
def test_tiny_models_match_the_exact_reference(n_streams, target):
    gguf = tiny_gguf(n_streams)
    eng = Engine(built(gguf, target).dir, gguf)
    prompt = [int(t) for t in np.random.default_rng(n_streams).integers(0, 512, 13)]
    toks, mine, errs = exact_parity(eng, _exact(gguf, target), prompt, STEPS)
    assert mine == toks
    assert max(errs) <= 1e-3, errs  # measured: 0.0 (bit-identical logits)


@pytest.mark.build
@pytest.mark.slow
@pytest.mark.parametrize("target", X86)
def test_shipped_model_matches_the_exact_reference(target):
    eng = Engine(built(SHIPPED, target).dir, SHIPPED)
    toks, mine, errs = exact_parity(eng, _exact(SHIPPED, target), eng.tokenize("def fib(n):"), STEPS)
    assert mine == toks
    assert max(errs) <= 1e-3, errs  # measured: 0.0 on avx512 and avx2


KINDS = {"attn.q": "qkv", "attn.o": "o", "ffn.gate": "gate_up", "ffn.down": "down"}  # in compute order


@torch.no_grad()
@one_torch_thread()
def _torch_run(model, prompt: list[int], toks: list[int]):
    """PyTorch logits along ``prompt`` + ``toks`` (teacher-forced), its int8 activations and their unrounded values
    ``x·127/amax`` by (token step, layer, kind)."""
    acts, scaled, step = {}, {}, [0]

    def hook(layer, kind):
        def f(_mod, args):
            x = args[0][0]  # [T, K]
            v = x * activation_scale(x).unsqueeze(-1)
            for t in range(x.shape[0]):
                scaled[(step[0] + t, layer, kind)] = v[t].numpy().copy()
                acts[(step[0] + t, layer, kind)] = torch.clamp(torch.round(v[t]), -127, 127).to(torch.int8).numpy()

        return f

    hooks = [b.get_submodule(part).register_forward_pre_hook(hook(i, kind))
             for i, b in enumerate(model.blocks) for part, kind in KINDS.items()]  # fmt: skip
    try:
        cache = model.new_cache(1)
        logits = [model(torch.tensor([prompt]), cache)[0, -1].numpy()]
        step[0] = len(prompt)
        for t in toks[:-1]:
            logits.append(model(torch.tensor([[t]]), cache)[0, -1].numpy())
            step[0] += 1
    finally:
        for h in hooks:
            h.remove()
    return logits, acts, scaled


@pytest.mark.build
@pytest.mark.slow
def test_pytorch_gap_is_int8_rounding_flips():
    """On the shipped model PyTorch's logits drift ~0.1 away from the compiled module's after some tokens. The exact
    reference (== the compiled module, to 1e-3) drifts from PyTorch the same way, and the int8 activations show why:
    up to the first one that differs, the logits agree to float32 noise; that first difference is a single value off
    by one whose unrounded PyTorch value lies at a .5 tie (a rounding flip: an ulp of different float32 order or an
    FMA decided it), and from there the flipped value lives on in the KV cache and the residual streams."""
    target = targets.detect()
    eng = Engine(built(SHIPPED, target).dir, SHIPPED)
    ex = _exact(SHIPPED, target)
    prompt = eng.tokenize("def fib(n):")
    toks, mine, errs = exact_parity(eng, ex, prompt, STEPS)
    assert mine == toks and max(errs) <= 1e-3
    ex.reset()
    ex.record = {}
    ex_logits = [ex.prefill(prompt)] + [ex.decode(t) for t in toks[:-1]]
    pt_logits, pt_acts, pt_scaled = _torch_run(reference(SHIPPED), prompt, toks)
    assert [int(np.argmax(x)) for x in pt_logits] == toks  # the same greedy tokens despite the gap
    gap = np.array([float(np.abs(a - b).max()) for a, b in zip(pt_logits, ex_logits, strict=True)])
    gap_compiled = np.array(errs)  # compiled vs exact, per step
    assert set(ex.record) == set(pt_acts)
    order = list(KINDS.values())
    keys = sorted(ex.record, key=lambda k: (k[0], k[1], order.index(k[2])))
    first = next(k for k in keys if (ex.record[k] != pt_acts[k]).any())
    d = ex.record[first].astype(int) - pt_acts[first]
    flipped = np.flatnonzero(d)
    assert np.abs(d).max() == 1 and len(flipped) == 1, (first, flipped)
    tie = float(np.abs(np.abs(pt_scaled[first][flipped[0]]) % 1 - 0.5))
    assert tie < 1e-4, tie  # PyTorch's unrounded value is within 1e-4 of a .5 tie
    step_of = [len(prompt) - 1] + [len(prompt) + i for i in range(STEPS - 1)]  # the last token fed, per logits row
    before = [g for g, s in zip(gap, step_of, strict=True) if s < first[0]]
    assert max(before, default=0.0) <= 1e-4, before
    assert gap.max() > 1e-2 and gap_compiled.max() <= 1e-3
    print(f"first int8 flip: token {first[0]}, layer {first[1]} {first[2]} (|value - tie| = {tie:.1e}); "
          f"PyTorch vs exact: {max(before, default=0):.1e} before it, {gap.max():.3f} max; "
          f"compiled vs exact max {gap_compiled.max():.1e}")  # fmt: skip


@pytest.mark.build
def test_parity_cli_against_the_exact_reference(tmp_path, capsys):
    from bench import parity

    gguf = tiny_gguf(2)
    out = tmp_path / "p.json"
    parity.main(["--model", str(gguf), "--entry", str(built(gguf).dir), "--reference", "exact", "--steps", "16",
                 "--json", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    assert r["reference"] == "exact" and r["greedy_prefix_agree"] == 16 and r["max_abs_logit_diff"] <= 1e-3
    assert json.loads(capsys.readouterr().out) == r
