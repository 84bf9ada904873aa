"""The compiled CPU graph's arithmetic in numpy: a forward whose every float32 operation is the compiled kernels' own.

:mod:`model.transformer` (PyTorch) and the compiled module (:mod:`compiler.lower`) compute the same model, but not
the same float32 operations: summation orders differ (RMSNorm's Σx² in vector lanes, attention's dot products),
LLVM fuses a multiply feeding an add into one FMA (TVM compiles with ``AllowFPOpFusion = Fast``), and ``exp`` is
glibc's ``expf``. The results differ by an ulp or so — until an int8 activation ``round(h·127/amax)`` lies within
that ulp of a .5 tie and rounds the other way; one flipped int8 value moves the logits by ~0.1 and, once in the KV
cache, stays. This module does what the compiled kernels do, operation for operation, so that the compiled runtime
can be held to it within 1e-3 (``tests/test_exact_reference.py``; each kernel is also checked bit for bit), while the
gap to PyTorch is shown to be those flips. No torch, no TVM: numpy on the GGUF's tensors.

What it mirrors (kernels of :mod:`compiler.graph_kernels` and :mod:`compiler.ops`, CPU targets):

* ``fma(a, b, c)`` — ``a·b + c`` rounded once (float64 product and sum, then float32: exact but for a double
  rounding in ~2⁻²⁹ of cases). Where two products meet, LLVM emits ``a·b + c·d = fma(c, d, a·b)`` (the second
  product fused: a sum of products is :func:`fma_chain`) but ``a·b − c·d = fma(a, b, −(c·d))`` (found by checking
  every candidate against the compiled kernels; ``tests/test_exact_reference.py`` pins each kernel bit for bit).
* RMSNorm + quantize (``rmsnorm_quant``): ``Σx²`` in ``lanes`` partial sums (``lanes`` = the schedule's vector knob,
  which can differ between the decode and the prefill kernels: :class:`Arith`), each an FMA chain, then the lanes
  added in order; ``inv = 1 / sqrt(Σ/D + eps)``, ``h = x·inv·w``, ``scale = 127 / max(max|h|, 1e-5)``,
  ``q = clip(round_half_even(h·scale))``.
* Ternary matmuls: exact integers ``Σ w·q`` (a float32 matmul of integer values below 2²⁴ is exact), then
  ``float32(acc) · (w_scale / x_scale)``.
* RoPE, attention (dot products in 16 lanes of FMA chains then the lanes in order, ``·1/√hd``, ``expf``, the
  denominator summed in key order, the output as FMA chains over keys, ``/ denominator``), SwiGLU
  ``g / (1 + expf(−g)) · u``, the mHC site mix and aggregate, the final RMSNorm (a serial FMA chain) and the LM
  head (per row, 64 lanes of FMA chains over ``d``, then the lanes in order).
* Not multi-head latent attention nor DeltaNet layers (refused with a ValueError naming the field: their parity is
  with PyTorch, ``tests/test_mla_compiled.py``).
* A mixture of experts (``n_experts > 0``): the router on the serial RMSNorm in float64 (:func:`route`), the chosen
  experts' SwiGLU FFNs on the block's one RMSNorm+quantize, their outputs summed by weight (:func:`moe_combine`).

The prefill of the compiled module runs chunks of tokens; every kernel treats a token's row on its own, so this
reference runs prompts a token at a time (with the prefill kernel's RMSNorm lanes) and gets the same numbers.

    python -c "from model.exact_reference import ExactReference; r = ExactReference.from_gguf('models/small.gguf'); \\
print(r.prefill([1, 2, 3]).argmax())"
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from dataclasses import dataclass

import numpy as np

from model.ternary.quant import ACT_QMAX, SCALE_EPS

F16, F32, F64 = np.float16, np.float32, np.float64
TERNARY = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ---------------------------------------------------------------------------------------------------------------
# float32 primitives as the compiled code computes them
# ---------------------------------------------------------------------------------------------------------------
def fma(a, b, c) -> np.ndarray:
    """``a·b + c`` with one float32 rounding (the product is exact in float64)."""
    return (np.asarray(a, F64) * np.asarray(b, F64) + np.asarray(c, F64)).astype(F32)


def fma_chain(terms: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``a₀b₀ + a₁b₁ + …`` (left to right) as LLVM contracts it: ``a₀b₀`` rounded, then ``acc = fma(aⱼ, bⱼ, acc)``."""
    (a0, b0), rest = terms[0], terms[1:]
    acc = (np.asarray(a0, F32) * np.asarray(b0, F32)).astype(F32)
    for a, b in rest:
        acc = fma(a, b, acc)
    return acc


@functools.cache
def _libm_expf():
    lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    f = lib.expf
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return f


def expf(x) -> np.ndarray:
    """glibc's ``expf`` (what the compiled kernels call), vectorized: ``exp`` in float64 rounded to float32 is the
    correctly rounded result, which ``expf`` returns except within ~10⁻³ ulp of a rounding tie; the values near a tie
    are recomputed by calling ``expf`` itself."""
    x = np.asarray(x, F32)
    y64 = np.exp(x.astype(F64))
    y = y64.astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        frac = np.abs(y64 - y.astype(F64)) / np.spacing(np.abs(y)).astype(F64)
    near = np.flatnonzero(~(frac < 0.49))  # also NaN / inf
    if near.size:
        f, flat = _libm_expf(), y.reshape(-1)
        for i in near:
            flat[i] = f(float(x.reshape(-1)[i]))
    return y


def lane_sum_squares(x: np.ndarray, lanes: int) -> np.ndarray:
    """``Σx²`` over the last axis as ``rmsnorm_quant`` sums it: ``lanes`` FMA chains (lane ``l`` takes ``x[o·lanes +
    l]``, ``o`` ascending), then ``((0 + r₀) + r₁) + …``."""
    x = np.asarray(x, F32)
    xs = x.reshape(*x.shape[:-1], -1, lanes)
    r = np.zeros((*x.shape[:-1], lanes), F32)
    for o in range(xs.shape[-2]):
        r = fma(xs[..., o, :], xs[..., o, :], r)
    s = np.zeros(x.shape[:-1], F32)
    for i in range(lanes):
        s = (s + r[..., i]).astype(F32)
    return s


def serial_sum_squares(x: np.ndarray) -> np.ndarray:
    """``Σx²`` as an unscheduled reduction: one FMA chain in index order (the final RMSNorm)."""
    x = np.asarray(x, F32)
    s = np.zeros(x.shape[:-1], F32)
    for d in range(x.shape[-1]):
        s = fma(x[..., d], x[..., d], s)
    return s


@dataclass(frozen=True)
class Quantized:
    q: np.ndarray  # int8 [..., K]
    scale: np.ndarray  # float32 [...]
    total: np.ndarray  # int32 [...]


def quantize(h: np.ndarray) -> Quantized:
    """``scale = 127 / max(max|h|, 1e-5)``, ``q = clip(round_half_even(h·scale), ±127)`` (``quantize``, the tail of
    ``rmsnorm_quant``)."""
    h = np.asarray(h, F32)
    scale = (F32(ACT_QMAX) / np.maximum(np.abs(h).max(axis=-1), F32(SCALE_EPS))).astype(F32)
    q = np.clip(np.rint((h * scale[..., None]).astype(F32)), -ACT_QMAX, ACT_QMAX).astype(np.int8)
    return Quantized(q, scale, q.sum(axis=-1, dtype=np.int32))


def rmsnorm_quant(x: np.ndarray, w: np.ndarray, lanes: int, eps: float = 1e-5) -> Quantized:
    ss = lane_sum_squares(x, lanes)
    inv = (F32(1) / np.sqrt((ss / F32(x.shape[-1])).astype(F32) + F32(eps))).astype(F32)
    return quantize(((x * inv[..., None]).astype(F32) * w).astype(F32))


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ss = serial_sum_squares(x)
    r = (F32(1) / np.sqrt((ss / F32(x.shape[-1])).astype(F32) + F32(eps))).astype(F32)
    return ((x * r[..., None]).astype(F32) * w).astype(F32)


def matmul(a: Quantized, codes: np.ndarray, w_scale: np.float32) -> np.ndarray:
    """``float32(Σ w·q) · (w_scale / x_scale)``; ``codes`` are the ternary values as float32 ``[M, K]``: the float32
    matmul of integers is exact (every partial sum stays below 127·K < 2²⁴)."""
    acc = a.q.astype(F32) @ codes.T
    return (acc * (F32(w_scale) / a.scale)[..., None]).astype(F32)


def route(h: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A mixture of experts' routing (``graph_kernels.router_logits`` and ``router_topk``): float64 logits, the ``k``
    largest (ties: the lower index first) and their softmax in float64, rounded to float32. The kernel sums the
    logits serially and this does not; the two agree to float64 rounding, which could only matter at a float64 tie."""
    logits = np.asarray(h, F64) @ np.asarray(router, F64).T
    ids = np.argsort(-logits, kind="stable")[:k]
    top = logits[ids]
    e = np.exp(top - top[0])
    return ids, (e / e.sum()).astype(F32)


def moe_combine(ys: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """``Σ_j w[j]·y[j]`` in slot order as an FMA chain (``graph_kernels.moe_combine``)."""
    return fma_chain([(w[j], y) for j, y in enumerate(ys)])


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of ``x [..., hd]``: ``a·c − b·s = fma(a, c, −(b·s))`` and ``b·c + a·s = fma(a, s, b·c)``."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    lo = fma(a, cos, -(b * sin).astype(F32))
    hi = fma(a, sin, (b * cos).astype(F32))
    return np.concatenate([lo, hi], axis=-1)


def attention(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, n: int) -> np.ndarray:
    """One token's causal GQA attention over keys ``0..n-1``: ``q [H, hd]``, caches ``[Hkv, C, hd]`` → ``[H·hd]``."""
    H, hd = q.shape
    g = H // kc.shape[0]
    k = np.repeat(kc[:, :n], g, axis=0)  # [H, n, hd]
    v = np.repeat(vc[:, :n], g, axis=0)
    L = next(m for m in (16, 8, 4, 2, 1) if hd % m == 0)  # the kernel's vector lanes of a dot product
    part = (q[:, None, :L] * k[:, :, :L]).astype(F32)  # [H, n, L]
    for io in range(1, hd // L):
        part = fma(q[:, None, io * L : (io + 1) * L], k[:, :, io * L : (io + 1) * L], part)
    sc = part[..., 0]
    for lane in range(1, L):
        sc = (sc + part[..., lane]).astype(F32)
    sc = (sc * F32(1.0 / math.sqrt(hd))).astype(F32)
    e = expf(sc - sc.max(axis=1, keepdims=True))
    den = np.zeros(H, F32)
    o = np.zeros((H, hd), F32)
    for j in range(n):
        den = (den + e[:, j]).astype(F32)
        o = fma(e[:, j : j + 1], v[:, j], o)
    return (o / den[:, None]).astype(F32).reshape(-1)


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    return ((g / (F32(1) + expf(-g))).astype(F32) * u).astype(F32)


def relu2_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    r = np.maximum(g, F32(0))
    return ((r * r).astype(F32) * u).astype(F32)


GATED = {"silu": silu_mul, "relu2": relu2_mul}


def mhc_mix(X: np.ndarray, y: np.ndarray, h_res: np.ndarray, h_post: np.ndarray) -> np.ndarray:
    """``X'[s] = h_res[s, 0]·X[0] + … + h_res[s, S-1]·X[S-1] + h_post[s]·y``, an :func:`fma_chain` (``X [S, D]``)."""
    S = X.shape[0]
    return np.stack([fma_chain([*((h_res[s, j], X[j]) for j in range(S)), (h_post[s], y)]) for s in range(S)])


def mhc_aggregate(X: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``u = Σ_s h[s]·X[s]`` as a reduction from 0: ``fma(h[s], X[s], acc)`` in stream order."""
    u = np.zeros(X.shape[1], F32)
    for s in range(X.shape[0]):
        u = fma(h[s], X[s], u)
    return u


def lane_dot(h: np.ndarray, E: np.ndarray, lanes: int) -> np.ndarray:
    """``Σ_d h[d]·E[v, d]`` for every row ``v`` in ``lanes`` FMA chains (lane ``l`` takes ``d = l, l + lanes, …``),
    then the lanes folded in halves: lane ``l`` += lane ``l + lanes/2``, then ``+ lanes/4``, … ``+ 1`` (the LM
    head)."""
    Ev = E.reshape(E.shape[0], -1, lanes)
    hv = np.asarray(h, F32).reshape(-1, lanes)
    r = np.zeros((E.shape[0], lanes), F32)
    for o in range(Ev.shape[1]):
        r = fma(hv[o], Ev[:, o].astype(F32), r)
    while r.shape[1] > 1:
        half = r.shape[1] // 2
        r = (r[:, :half] + r[:, half:]).astype(F32)
    return r[:, 0]


def lm_head(h: np.ndarray, emb: np.ndarray, lanes: int = 16) -> np.ndarray:
    """``logits = E·h`` as ``compiler.graph_kernels.lm_head`` computes it (``emb [V, D]``, float16 or float32;
    ``lanes``: its ``HEAD_LANES``, which ``tests/test_exact_reference.py`` checks)."""
    return lane_dot(h, emb, lanes)


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arith:
    """The knobs of a compiled build that change float results: the vector lanes of ``rmsnorm_quant``'s ``Σx²`` in
    the decode (one token) and the prefill (a chunk) kernels. :func:`compiler.arith.arith_of` reads them from a
    build's tuning records."""

    norm_lanes_decode: int = 32
    norm_lanes_prefill: int = 32
    # the FFN sub-norm's kernel (D = ffn_hidden; arch bitnet); the attention sub-norm shares the d_model kernel
    ffn_norm_lanes_decode: int = 32
    ffn_norm_lanes_prefill: int = 32


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """The compiled module's RoPE tables (``compiler.graph_kernels.rope_tables``): angles in float64, stored float32."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=F64) / head_dim)
    angles = np.outer(np.arange(max_len, dtype=F64), inv_freq)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


class ExactReference:
    """A token at a time over a KV cache, like the engine: :meth:`prefill` (the prompt) then :meth:`decode`.

    ``record=True`` keeps every int8 activation vector in :attr:`record` (``(step, layer, kind) → int8 array``, kind
    ``qkv`` | ``o`` | ``gate_up`` | ``down``; step 0.. counts tokens fed), to compare with PyTorch's."""

    def __init__(self, g, arith: Arith = Arith(), record: bool = False) -> None:
        cfg = self.cfg = g.config
        if cfg.mla or cfg.full_attention_interval:
            field = "kv_lora_rank" if cfg.mla else "full_attention_interval"
            raise ValueError(f"{field}={getattr(cfg, field)}: the exact reference mirrors GQA (and MoE) graphs only; "
                             "compare a latent-attention or DeltaNet model with PyTorch (bench.parity --reference "
                             "torch)")  # fmt: skip
        self.arith = arith
        t = g.tensors
        self.emb = t["token_embd.weight"].as_stored()  # as the build keeps it (F16/F32; Q8_0 etc. → float16)
        self.head = self.emb if cfg.tie_embeddings else t["output.weight"].as_stored()
        self.out_norm = t["output_norm.weight"].to_float().astype(F32)
        self.cos, self.sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = []
        coeffs = g.mhc_coefficients()
        for i in range(cfg.n_layers):
            norms = ("attn_norm", "ffn_norm") + (("attn_sub_norm", "ffn_sub_norm") if cfg.sub_norms else ())
            lay = {n: t[f"blk.{i}.{n}.weight"].to_float().astype(F32) for n in norms}
            for n in TERNARY:
                if cfg.n_experts and n.startswith("ffn_"):  # a mixture of experts: the stacks and the router
                    tw = g.ternary(f"blk.{i}.{n}_exps.weight")
                    lay[n] = [(tw.codes[e].astype(F32), F32(tw.scale[e])) for e in range(cfg.n_experts)]
                    continue
                tw = g.ternary(f"blk.{i}.{n}.weight")
                lay[n] = (tw.codes.astype(F32), F32(tw.scale))
            if cfg.n_experts:
                lay["router"] = t[f"blk.{i}.ffn_gate_inp.weight"].to_float().astype(F32)
            lay["mhc"] = (coeffs[2 * i], coeffs[2 * i + 1])
            self.layers.append(lay)
        shape = (cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.kc = [np.zeros(shape, F32) for _ in range(cfg.n_layers)]
        self.vc = [np.zeros(shape, F32) for _ in range(cfg.n_layers)]
        self.pos = 0
        self.record = {} if record else None

    @classmethod
    def from_gguf(cls, path, arith: Arith = Arith(), record: bool = False) -> ExactReference:
        from model.gguf_io import read_gguf

        return cls(read_gguf(path), arith, record)

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens``; the logits after the last (the prefill kernels' RMSNorm lanes)."""
        for tok in tokens:
            logits = self._step(int(tok), self.arith.norm_lanes_prefill, self.arith.ffn_norm_lanes_prefill)
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._step(int(token), self.arith.norm_lanes_decode, self.arith.ffn_norm_lanes_decode)

    def _keep(self, layer: int, kind: str, q: Quantized) -> None:
        if self.record is not None:
            self.record[(self.pos, layer, kind)] = q.q.copy()

    def _step(self, tok: int, lanes: int, ffn_lanes: int) -> np.ndarray:
        cfg, p, eps = self.cfg, self.pos, self.cfg.norm_eps
        if p >= cfg.max_seq_len:
            raise ValueError(f"the context of {cfg.max_seq_len} tokens is full")
        H, Hkv, hd, S = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_streams
        x = self.emb[tok].astype(F32)
        first = self.layers[0]["mhc"][0]
        u = fma_chain([(first.h_pre[s], x) for s in range(S)])  # pre_expand: u = Σ_s h_pre[s]·x
        X = np.broadcast_to(x, (S, x.shape[0]))
        cos, sin = self.cos[p], self.sin[p]
        for i, lay in enumerate(self.layers):
            for site, c in enumerate(lay["mhc"]):
                if site == 0:
                    a = rmsnorm_quant(u, lay["attn_norm"], lanes, eps)
                    self._keep(i, "qkv", a)
                    q = matmul(a, *lay["attn_q"]).reshape(H, hd)
                    k = matmul(a, *lay["attn_k"]).reshape(Hkv, hd)
                    v = matmul(a, *lay["attn_v"]).reshape(Hkv, hd)
                    self.kc[i][:, p] = rope(k, cos, sin)
                    self.vc[i][:, p] = v
                    o = attention(rope(q, cos, sin), self.kc[i], self.vc[i], p + 1)
                    o8 = rmsnorm_quant(o, lay["attn_sub_norm"], lanes, eps) if cfg.sub_norms else quantize(o)
                    self._keep(i, "o", o8)
                    y = matmul(o8, *lay["attn_output"])
                elif cfg.n_experts:
                    ids, w = route(rmsnorm(u[None], lay["ffn_norm"], eps)[0], lay["router"], cfg.n_experts_used)
                    a = rmsnorm_quant(u, lay["ffn_norm"], lanes, eps)
                    self._keep(i, "gate_up", a)
                    ys = []
                    for e in ids:
                        hh = GATED[cfg.ffn_act](matmul(a, *lay["ffn_gate"][e]), matmul(a, *lay["ffn_up"][e]))
                        ys.append(matmul(quantize(hh), *lay["ffn_down"][e]))
                    y = moe_combine(ys, w)
                else:
                    a = rmsnorm_quant(u, lay["ffn_norm"], lanes, eps)
                    self._keep(i, "gate_up", a)
                    hh = GATED[cfg.ffn_act](matmul(a, *lay["ffn_gate"]), matmul(a, *lay["ffn_up"]))
                    h8 = rmsnorm_quant(hh, lay["ffn_sub_norm"], ffn_lanes, eps) if cfg.sub_norms else quantize(hh)
                    self._keep(i, "down", h8)
                    y = matmul(h8, *lay["ffn_down"])
                X = mhc_mix(X, y, c.h_res, c.h_post)
                last = i == cfg.n_layers - 1 and site == 1
                if last:
                    u = mhc_aggregate(X, np.full(S, 1.0 / S, F32))  # collapse: the mean of the streams
                else:
                    nxt = lay["mhc"][1] if site == 0 else self.layers[i + 1]["mhc"][0]
                    u = mhc_aggregate(X, nxt.h_pre)
        self.pos += 1
        return lm_head(rmsnorm(u[None], self.out_norm, cfg.norm_eps)[0], self.head)
