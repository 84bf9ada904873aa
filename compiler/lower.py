"""GGUF model → one Relax IRModule with ``prefill`` and ``decode`` over an explicit, in-place KV cache.

Signatures (``L`` layers, ``Hkv`` KV heads, context ``C``, head dim ``hd``; params in :func:`param_specs` order)::

    decode(tok int32[1], pos int32[1], kc_0, vc_0, ..., kc_{L-1}, vc_{L-1}, *params) -> logits float32[V]
    prefill(toks int32[P], pos int32[1], last int32[1], kc_0, vc_0, ..., *params)   -> logits float32[V]

Each ``kc_l``/``vc_l`` is ``float32[Hkv, C, hd]``; the graph writes the new keys/values into them **in place**
(``call_tir_inplace``) at ``pos .. pos+T-1`` and attends over ``[0, pos+t]``. ``prefill`` takes a fixed chunk of
``P`` tokens (padding allowed: rows past the real tokens write cache slots that later tokens overwrite before anyone
reads them, and causal masking keeps them out of the real rows) and returns the logits of row ``last``.

Kernels: every ternary matmul, the RMSNorm+quantize before q/k/v and gate/up, and the mHC site post+mix go through
:func:`compiler.schedule.get_primfunc` (the tuned record of ``tuning_logs/<target>/``, or the hand schedule with a loud
UNTUNED warning). Decode uses ``gemv_i8`` and ``mhc_post``; prefill uses ``gemm_i8`` with ``N = P`` (the tuned tile is
8) and a token-batched TE twin of ``mhc_post``. Embedding, RoPE, the cache write, attention, SwiGLU, the o/down
input quantize, the final norm and the LM head are the small kernels of :mod:`compiler.graph_kernels`.

CPU weight layout: every ternary matrix is stored once, in ``tile8`` (:mod:`compiler.layouts_x86`: the 64-byte
chunks of 8 rows side by side, so each thread of a decode GEMV streams one linear range), read by both the decode
GEMV and the prefill GEMM (``tile=8``). The LM head is ``[V, D]`` as the GGUF stores it (rows streamed once).
``weights="tl"`` (AVX-512 VBMI) stores them in the 1.67-bit ``tl{R}`` layout instead
(:mod:`compiler.layouts_x86_tl`): decode calls ``gemv_i8_tl``, prefill calls it once per token of the chunk. Both
layouts give the same integer dot products, hence bit-identical logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from compiler import graph_kernels as gk
from compiler import graph_kernels_gpu as gkg

log = logging.getLogger("compiler.build")

PREFILL_CHUNK = 8  # = compiler.tune.PREFILL_TOKENS: the gemm_i8 tile that is tuned
GPU_PREFILL_CHUNK = 16  # = compiler.tune.CUDA_PREFILL_TOKENS
TERNARY = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
CPU_TILE = 8  # row tile of the CPU weight layout (tile8), when it divides M
WEIGHT_LAYOUTS = ("tile8", "tl")  # CPU ternary weights: 2-bit tile8 (default) or 1.67-bit tl{R} (AVX-512 VBMI)


def cpu_tile(M: int) -> int:
    return CPU_TILE if M % CPU_TILE == 0 else 0


def tl_tile(M: int) -> int:
    """Row tiles (16 rows each) per group of the ``tl`` layout for output size M: the largest of 8, 4, 2, 1 fitting."""
    for r in (8, 4, 2, 1):
        if M % (16 * r) == 0:
            return r
    raise ValueError(f"weights='tl' needs every ternary matrix's output size to be a multiple of 16; M = {M}")


def check_weights(weights: str, gpu: bool) -> None:
    if weights not in WEIGHT_LAYOUTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_LAYOUTS}")
    if weights == "tl" and gpu:
        raise ValueError("weights='tl' is a CPU (AVX-512 VBMI) layout; the CUDA build uses dp4a")


@dataclass
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def param_specs(cfg, embed_dtype: str = "float32", head_dtype: str = "float32", gpu: bool = False,
                weights: str = "tile8") -> list[ParamSpec]:  # fmt: skip
    """The compiled functions' parameters after the KV cache, in order (names as stored in ``params.npz``).

    ``token_embd.weight [V, D]`` and the LM head ``lm_head.weight [V, D]`` keep the GGUF's float16 when it has
    it (exact; the kernels compute in float32). On GPUs the ternaries are ``int32[M, K/16]`` (``dp4a`` layout), on
    CPUs ``uint8[M/8, K/256, 8, 64]`` (``tile8``)."""
    D, V, hd, C, S = cfg.d_model, cfg.vocab_size, cfg.head_dim, cfg.max_seq_len, cfg.n_streams
    out = [
        ParamSpec("token_embd.weight", (V, D), embed_dtype),
        ParamSpec("lm_head.weight", (V, D), head_dtype),
    ]
    out += [ParamSpec("output_norm.weight", (D,), "float32"), ParamSpec("rope.cos", (C, hd // 2), "float32"),
            ParamSpec("rope.sin", (C, hd // 2), "float32")]  # fmt: skip
    shapes = cfg.ternary_shapes()
    for i in range(cfg.n_layers):
        out.append(ParamSpec(f"blk.{i}.attn_norm.weight", (D,), "float32"))
        out.append(ParamSpec(f"blk.{i}.ffn_norm.weight", (D,), "float32"))
        for t in TERNARY:
            M, K = _shape(shapes, t, cfg)
            out.append(ParamSpec(f"blk.{i}.{t}.weight", (M, K // 16), "int32") if gpu else
                       ParamSpec(f"blk.{i}.{t}.weight", _cpu_w_shape(M, K, weights), "uint8"))  # fmt: skip
            out.append(ParamSpec(f"blk.{i}.{t}.scale", (1,), "float32"))
        for site in ("mhc_attn", "mhc_ffn"):
            out += [ParamSpec(f"blk.{i}.{site}.h_pre", (S,), "float32"),
                    ParamSpec(f"blk.{i}.{site}.h_post", (S,), "float32"),
                    ParamSpec(f"blk.{i}.{site}.h_res", (S, S), "float32")]  # fmt: skip
    return out


def _shape(shapes: dict, t: str, cfg) -> tuple[int, int]:
    """(M, K) of a block's ternary matrix, from ``ModelConfig.ternary_shapes`` (keys by projection name)."""
    D, F, KV = cfg.d_model, cfg.ffn_hidden, cfg.kv_dim
    return {"attn_q": (D, D), "attn_k": (KV, D), "attn_v": (KV, D), "attn_output": (D, D), "ffn_gate": (F, D),
            "ffn_up": (F, D), "ffn_down": (D, F)}[t]  # fmt: skip


def _cpu_w_shape(M: int, K: int, weights: str = "tile8") -> tuple[int, ...]:
    if weights == "tl":
        from compiler.layouts_x86_tl import shape

        return shape(M, K, tl_tile(M))
    return (M // CPU_TILE, K // 256, CPU_TILE, 64) if cpu_tile(M) else (M, K // 4)


def _pack_cpu(codes: np.ndarray, weights: str = "tile8") -> np.ndarray:
    """int8 codes ``[M, K]`` → ``tile8`` (``rowmajor4`` when 8 does not divide M), or ``tl{R}``."""
    from compiler.layouts_x86 import tile_rowmajor4
    from compiler.layouts_x86_tl import pack_tl
    from model.ternary.layouts import pack_rowmajor4

    if weights == "tl":
        return pack_tl(codes, tl_tile(codes.shape[0]))
    w = pack_rowmajor4(codes)
    return tile_rowmajor4(w, CPU_TILE) if cpu_tile(codes.shape[0]) else w


def pack_params(g, gpu: bool = False, weights: str = "tile8") -> dict[str, np.ndarray]:
    """The GGUF's tensors → the kernels' inputs: ternaries repacked to ``tile8`` or ``tl{R}`` (GPU: ``dp4a``) + a
    float32 scale, floats as float32, mHC coefficients computed once, RoPE tables."""
    from compiler.layouts_gpu import pack_dp4a

    check_weights(weights, gpu)
    pack = pack_dp4a if gpu else (lambda codes: _pack_cpu(codes, weights))
    cfg = g.config
    p: dict[str, np.ndarray] = {}
    emb = g.tensors["token_embd.weight"]
    head = emb if cfg.tie_embeddings else g.tensors["output.weight"]
    p["token_embd.weight"] = np.ascontiguousarray(emb.data, float_dtype(emb))
    head_w = np.asarray(head.data, float_dtype(head))
    p["lm_head.weight"] = np.ascontiguousarray(head_w)  # [V, D]: a GEMV streaming rows (graph_kernels*.lm_head)
    p["output_norm.weight"] = g.tensors["output_norm.weight"].to_float().astype(np.float32)
    p["rope.cos"], p["rope.sin"] = gk.rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    coeffs = g.mhc_coefficients()
    for i in range(cfg.n_layers):
        for n in ("attn_norm", "ffn_norm"):
            p[f"blk.{i}.{n}.weight"] = g.tensors[f"blk.{i}.{n}.weight"].to_float().astype(np.float32)
        for t in TERNARY:
            tw = g.tensors[f"blk.{i}.{t}.weight"].ternary()
            p[f"blk.{i}.{t}.weight"] = pack(tw.codes)
            p[f"blk.{i}.{t}.scale"] = np.array([tw.scale], np.float32)
        for j, site in enumerate(("mhc_attn", "mhc_ffn")):
            c = coeffs[2 * i + j]
            p[f"blk.{i}.{site}.h_pre"] = np.asarray(c.h_pre, np.float32)
            p[f"blk.{i}.{site}.h_post"] = np.asarray(c.h_post, np.float32)
            p[f"blk.{i}.{site}.h_res"] = np.asarray(c.h_res, np.float32)
    for s in param_specs(cfg, str(p["token_embd.weight"].dtype), str(head_w.dtype), gpu, weights):
        a = p[s.name]
        if a.shape != s.shape or a.dtype != np.dtype(s.dtype):
            raise ValueError(f"packed {s.name}: {a.shape} {a.dtype}, expected {s.shape} {s.dtype}")
    return p


def float_dtype(t) -> str:
    """float16 for an F16 GGUF tensor (kept exactly), else float32."""
    return "float16" if np.dtype(t.data.dtype) == np.float16 else "float32"


def _has_cuda_schedule(kind: str) -> bool:
    from schedules.cuda import SCHEDULES

    return kind in SCHEDULES


@dataclass
class Lowering:
    """Builds the IRModule; ``kernels`` records where each tuned-operator kernel came from (op key → source)."""

    cfg: object
    target: str
    chunk: int = PREFILL_CHUNK
    logs_root: object = None
    embed_dtype: str = "float32"
    head_dtype: str = "float32"
    weights: str = "tile8"
    cores: int | None = None  # the thread count CPU kernels are built for (None: targets.build_cores)
    kernels: dict[str, str] = field(default_factory=dict)
    op_flags: set[str] = field(default_factory=set)  # CPU flags the tuned-operator kernels need beyond the target's

    def __post_init__(self):
        from tvm import relax

        self.gpu = self.target == "cuda"
        check_weights(self.weights, self.gpu)
        if self.gpu and self.chunk == PREFILL_CHUNK:
            self.chunk = GPU_PREFILL_CHUNK
        self.bb = relax.BlockBuilder()
        self._gv: dict[str, object] = {}
        self._tgt = None

    # --- kernels -----------------------------------------------------------------------------------------------
    def _op(self, kind: str, **dims):
        from compiler.ops import make_op
        from compiler.schedule import get_primfunc

        op = make_op(kind, **dims)
        self.op_flags.update(getattr(op, "cpu_flags", ()))
        if op.func_name not in self._gv and self.gpu and not _has_cuda_schedule(kind):
            # no tunable CUDA template (the normalisation/elementwise ops): the TE, given a fixed CUDA schedule in
            # compiler.build (schedules.cuda.rows)
            self.kernels[op.key] = "fixed"
            if kind == "rmsnorm_quant":  # one fused kernel (shared-memory reductions) instead of seven
                from compiler.ops.rmsnorm_quant import NORM_EPS

                func = gkg.norm_quantize(op.N, op.D, eps=NORM_EPS)
            elif kind == "mhc_post":  # one kernel instead of three
                func = gkg.mhc_post(op.D, op.S, bool(op.first), bool(op.last))
            else:
                func = op.compute()
            self._gv[op.func_name] = self.bb.add_func(func, op.func_name)
        if op.func_name not in self._gv:
            sf = get_primfunc(op, self.target, self.logs_root, cores=self.cores)
            self.kernels[op.key] = sf.source
            log.info("  kernel %-40s %s", op.key, sf.source.upper() if sf.source != "tuned" else "tuned")
            self._gv[op.func_name] = self.bb.add_func(sf.for_relax(), op.func_name)
        return self._gv[op.func_name], op

    def _te(self, name: str, builder, *args, sched: bool = False):
        key = f"{name}_" + "_".join(str(int(a)) for a in args)
        if key not in self._gv:
            f = builder(*args)
            if sched and not self.gpu:  # GPU: dlight schedules every unscheduled kernel (compiler.build)
                f = gk.schedule(f, self._target())
            self._gv[key] = self.bb.add_func(f, key)
        return self._gv[key]

    def _quantize(self, T: int, K: int):
        return gkg.norm_quantize(T, K) if self.gpu else gk.quantize(T, K)

    def _target(self):
        if self._tgt is None:
            from targets import get_target

            self._tgt = get_target(self.target)
        return self._tgt

    # --- helpers -----------------------------------------------------------------------------------------------
    def _call(self, gv, args, outs):
        from tvm import relax

        tys = [relax.TensorType(s, d) for s, d in outs]
        r = self.bb.emit(relax.call_tir(gv, args, tys if len(tys) > 1 else tys[0]))
        if len(tys) == 1:
            return r
        return [self.bb.emit(relax.TupleGetItem(r, i)) for i in range(len(tys))]

    def _reshape(self, x, shape):
        from tvm import relax

        return self.bb.emit(relax.op.reshape(x, shape))

    def _matmul(self, T, q8, sc, qs, W, ws, M, K):
        if self.gpu:  # dp4a kernels read the int8 activations as int32 words: a view, no copy
            from tvm import relax

            x4 = self.bb.emit(relax.op.memory.view(q8, (T, K // 4), "int32"))
            if T == 1:
                gv, _ = self._op("gemv_dp4a", M=M, K=K)
                y = self._call(gv, [W, self._reshape(x4, (K // 4,)), qs, sc, ws], [((M,), "float32")])
                return self._reshape(y, (1, M))
            gv, _ = self._op("gemm_dp4a", N=T, M=M, K=K)
            return self._call(gv, [W, x4, qs, sc, ws], [((T, M), "float32")])
        if self.weights == "tl":  # 1.67-bit weights: the table-lookup GEMV, once per token (x_sum is not needed)
            from tvm import relax

            gv, _ = self._op("gemv_i8_tl", M=M, K=K, tile=tl_tile(M))
            if T == 1:
                return self._reshape(self._call(gv, [W, self._reshape(q8, (K,)), sc, ws], [((M,), "float32")]), (1, M))
            rows = []
            for t in range(T):
                xt, st = (self.bb.emit(relax.op.strided_slice(a, axes=[0], begin=[t], end=[t + 1])) for a in (q8, sc))
                rows.append(self._reshape(self._call(gv, [W, self._reshape(xt, (K,)), st, ws], [((M,), "float32")]),
                                          (1, M)))  # fmt: skip
            return self.bb.emit(relax.op.concat(rows, axis=0))
        if T == 1:  # decode: the tuned GEMV
            gv, _ = self._op("gemv_i8", M=M, K=K, tile=cpu_tile(M))
            y = self._call(gv, [W, self._reshape(q8, (K,)), qs, sc, ws], [((M,), "float32")])
            return self._reshape(y, (1, M))
        gv, _ = self._op("gemm_i8", N=T, M=M, K=K, tile=cpu_tile(M))
        return self._call(gv, [W, q8, qs, sc, ws], [((T, M), "float32")])

    # --- the functions -----------------------------------------------------------------------------------------
    def function(self, name: str):
        from tvm import relax

        cfg, bb = self.cfg, self.bb
        T = 1 if name == "decode" else self.chunk
        D, V, S, L = cfg.d_model, cfg.vocab_size, cfg.n_streams, cfg.n_layers
        H, Hkv, hd, C, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.max_seq_len, cfg.ffn_hidden
        KV = cfg.kv_dim
        f32 = "float32"

        def var(n, shape, dtype):
            return relax.Var(n.replace(".", "_"), relax.TensorType(shape, dtype))

        toks = var("tokens", (T,), "int32")
        pos = var("pos", (1,), "int32")
        inputs = [toks, pos]
        last = None
        if name == "prefill":
            last = var("last", (1,), "int32")
            inputs.append(last)
        cache = []
        for i in range(L):
            cache += [var(f"kc_{i}", (Hkv, C, hd), f32), var(f"vc_{i}", (Hkv, C, hd), f32)]
        specs = self.specs()
        pv = {s.name: var(s.name, s.shape, s.dtype) for s in specs}
        with bb.function(name, inputs + cache + [pv[s.name] for s in specs]):
            with bb.dataflow():
                x = bb.emit(relax.op.take(pv["token_embd.weight"], toks, axis=0, mode="clip"))  # [T, D]
                if self.embed_dtype != f32:
                    x = bb.emit(relax.op.astype(x, f32))
                h_pre0 = pv["blk.0.mhc_attn.h_pre"]
                u = self._call(self._te("pre_expand", gk.pre_expand, T, D, S), [x, h_pre0], [((T, D), f32)])
                X = None
                n_sites = 2 * L
                for site in range(n_sites):
                    i, is_attn = site // 2, site % 2 == 0
                    sname = "mhc_attn" if is_attn else "mhc_ffn"
                    pre = f"blk.{i}."
                    gv, _ = self._op("rmsnorm_quant", D=D, N=T)
                    norm_w = pv[pre + ("attn_norm" if is_attn else "ffn_norm") + ".weight"]
                    q8, sc, qs = self._call(gv, [u, norm_w], [((T, D), "int8"), ((T,), f32), ((T,), "int32")])

                    def mm(t, q8, sc, qs, M, K, pre=pre):
                        return self._matmul(T, q8, sc, qs, pv[pre + t + ".weight"], pv[pre + t + ".scale"], M, K)

                    if is_attn:
                        qv = mm("attn_q", q8, sc, qs, D, D)
                        kv = mm("attn_k", q8, sc, qs, KV, D)
                        vv = mm("attn_v", q8, sc, qs, KV, D)
                        cos, sin = pv["rope.cos"], pv["rope.sin"]
                        qr = self._call(self._te("rope_q", gk.rope_q, T, H, hd, C), [qv, pos, cos, sin],
                                        [((T, H, hd), f32)])  # fmt: skip
                        kvgv = self._te("kv_update", lambda *a: gk.kv_update(*a, gpu=self.gpu), T, Hkv, hd, C)
                        ty = relax.TensorType((Hkv, C, hd), f32)
                        kv_args = [kv, vv, pos, cos, sin, cache[2 * i], cache[2 * i + 1]]
                        upd = bb.emit(relax.call_tir_inplace(kvgv, kv_args, [5, 6], [ty, ty]))
                        kc, vc = bb.emit(relax.TupleGetItem(upd, 0)), bb.emit(relax.TupleGetItem(upd, 1))
                        att = self._te("attention", (gkg if self.gpu else gk).attention, T, H, Hkv, hd, C)
                        o = self._call(att, [qr, kc, vc, pos], [((T, D), f32), ((T * H, C), f32), ((T * H, 2), f32)])[0]
                        o8, osc, osum = self._call(self._te("quantize", self._quantize, T, D), [o],
                                                   [((T, D), "int8"), ((T,), f32), ((T,), "int32")])  # fmt: skip
                        y = mm("attn_output", o8, osc, osum, D, D)
                    else:
                        gt = mm("ffn_gate", q8, sc, qs, F, D)
                        up = mm("ffn_up", q8, sc, qs, F, D)
                        hh = self._call(self._te("silu_mul", gk.silu_mul, T, F, sched=True), [gt, up], [((T, F), f32)])
                        h8, hsc, hsum = self._call(self._te("quantize", self._quantize, T, F), [hh],
                                                   [((T, F), "int8"), ((T,), f32), ((T,), "int32")])  # fmt: skip
                        y = mm("ffn_down", h8, hsc, hsum, D, F)
                    first, lst = site == 0, site == n_sites - 1
                    coef = [pv[f"{pre}{sname}.h_res"], pv[f"{pre}{sname}.h_post"]]
                    if not lst:
                        nxt = site + 1
                        coef.append(pv[f"blk.{nxt // 2}.{'mhc_attn' if nxt % 2 == 0 else 'mhc_ffn'}.h_pre"])
                    if T == 1:
                        gv, _ = self._op("mhc_post", D=D, S=S, first=int(first), last=int(lst))
                        xin = self._reshape(x, (1, D) if self.gpu else (D,)) if first else X
                        outs = ([] if lst else [((S, D), f32)]) + [((D,), f32), ((1,), f32)]
                        r = self._call(gv, [xin, self._reshape(y, (D,)), *coef], outs)
                        if not lst:
                            X = r[0]
                        u = self._reshape(r[-2], (1, D))
                    else:
                        gv = self._te(
                            "mhc_post_tokens", lambda *a: gk.mhc_post_tokens(*a[:3], bool(a[3]), bool(a[4])),
                            T, D, S, int(first), int(lst),
                        )  # fmt: skip
                        xin = x if first else X
                        outs = ([] if lst else [((T, S, D), f32)]) + [((T, D), f32)]
                        r = self._call(gv, [xin, y, *coef], outs)
                        if lst:
                            u = r
                        else:
                            X, u = r[0], r[1]
                hn = self._call(self._rmsnorm(T, D), [u, pv["output_norm.weight"]], [((T, D), f32)])
                if last is not None:
                    hn = bb.emit(relax.op.take(hn, last, axis=0, mode="clip"))
                hv = self._reshape(hn, (D,))
                head = self._gv.get("lm_head") or self.bb.add_func(
                    (gkg if self.gpu else gk).lm_head(V, D, self.head_dtype), "lm_head"
                )  # fmt: skip
                self._gv["lm_head"] = head
                logits = self._call(head, [hv, pv["lm_head.weight"]], [((V,), f32)])
                out = bb.emit_output(logits)
            bb.emit_func_output(out)

    def _rmsnorm(self, T, D):
        key = f"rmsnorm_{T}_{D}"
        if key not in self._gv:
            self._gv[key] = self.bb.add_func(gk.rmsnorm(T, D, self.cfg.norm_eps), key)
        return self._gv[key]

    def cpu_flags(self) -> list[str]:
        """The CPU flags the module's kernels execute: the target's and its operators' (``meta.json`` ``cpu_flags``,
        checked by :func:`targets.cpu.check_flags`)."""
        from targets import REQUIRED_FLAGS

        return sorted(set(REQUIRED_FLAGS.get(self.target, ())) | self.op_flags)

    def specs(self) -> list[ParamSpec]:
        return param_specs(self.cfg, self.embed_dtype, self.head_dtype, self.gpu, self.weights)

    def module(self):
        self.function("decode")
        self.function("prefill")
        return self.bb.get()
