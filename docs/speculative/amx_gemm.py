"""The ternary GEMM on Intel AMX (AMX-TILE + AMX-INT8, Sapphire Rapids and later Xeons), against the tuned VNNI
``gemm_i8`` the builds use: an experiment, kept with its result (docs/speculative.md, "AMX tile multiplies").

Two kernels, both bit-exact with ``gemm_i8`` (checked here on every shape before timing):

* ``tile8``: reads the weights the decode GEMV streams (2-bit ``tile8``, no second copy). A task is up to four 16-row
  groups; per 256-code chunk it unpacks the four 2-bit planes ``j`` (``(byte >> 2j) & 3``: 64 codes of a row, ``k =
  256c + 4b + j``) into 16 × 64-byte tiles in memory, then ``tdpbusd`` multiplies each with the tokens' activations
  (``B[kk, 4n + i] = x[n, 256c + 16kk + 4i + j]``, repacked once per call) into one int32 accumulator tile per group.
* ``codes``: the weights as one byte a code (4× the bytes), each 16 × 64 block a contiguous tile: no unpacking, the
  activations a plain word transpose (``B[kk, n] = x32[n, 16q + kk]``).

``tdpbusd`` does 16 rows × up to 16 tokens × 64 codes in ~16 cycles whatever the token count; VNNI needs one
``vpdpbusd`` per row, token and 64 codes. What AMX costs instead: the tile loads wait for the stores they read (the
``tile8`` kernel's unpacked planes), the accumulators drain at the end of each task, and a call has fixed work (the
activations' repack, the tile configuration).

    python docs/speculative/amx_gemm.py [--rounds 7] [--json docs/speculative/amx_gemm_intel.json]

Linux only, on a CPU with ``amx_tile`` and ``amx_int8``; the process asks for the tile data first
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import tvm
from tvm.script import tirx as Tx

from bench.machine import git_commit, machine
from compiler.ops import make_op
from compiler.ops import ternary_gemm_amx as amx
from compiler.ops.stacked import n_scales
from compiler.schedule import get_primfunc
from model.ternary.layouts_x86 import untile_rowmajor4
from targets import get_target, has_amx, num_cores
from targets.cpu import request_amx

ROWS, TOKENS = amx.ROWS, amx.TOKENS
SHAPES = [  # (N, M, K, parts): the shipped model's verify rows (N = 2, 4) and prefill (8, 16); 2B-4T's prefill
    (2, 1024, 512, (512, 256, 256)), (4, 1024, 512, (512, 256, 256)), (2, 3072, 512, (1536, 1536)),
    (4, 3072, 512, (1536, 1536)), (4, 512, 512, ()), (4, 512, 1536, ()),
    (8, 1024, 512, (512, 256, 256)), (8, 3072, 512, (1536, 1536)), (8, 512, 1536, ()),
    (16, 3072, 512, (1536, 1536)), (16, 512, 1536, ()), (8, 2560, 2560, ()),
    (8, 3840, 2560, (2560, 640, 640)), (8, 13824, 2560, (6912, 6912)), (8, 2560, 6912, ()),
    (16, 3840, 2560, (2560, 640, 640)), (16, 13824, 2560, (6912, 6912)), (16, 2560, 6912, ()),
]  # fmt: skip


def codes_kernel(N: int, M: int, K: int, parts: tuple[int, ...], cores: int):
    """The AMX GEMM over ``codes`` weights (``[M/16, K/64, 16, 64]``, one byte a code) as a PrimFunc with
    ``gemm_i8``'s other arguments; the ``tile8`` one is the build's (:mod:`compiler.ops.ternary_gemm_amx`), whose
    task split, tile registers and epilogue this one shares."""
    S, GT, Q = n_scales(parts), amx.groups_per_task(M), K // 64
    T = M // (ROWS * GT)
    P = min(T, cores)
    tmm = lambda v: Tx.Cast("int8", v)  # noqa: E731
    configure, drain = amx.task_macros(N, GT, parts)
    call = amx.tile_op

    @Tx.prim_func
    def gemm(W: Tx.Buffer((M // ROWS, Q, ROWS, 64), "uint8"), x: Tx.Buffer((N, K), "int8"),
             x_sum: Tx.Buffer((N,), "int32"), x_scale: Tx.Buffer((N,), "float32"),
             w_scale: Tx.Buffer((S,), "float32"), y: Tx.Buffer((N, M), "float32")):  # fmt: skip
        x32 = Tx.decl_buffer((N, K // 4), "int32", data=x.data)  # four activations a word
        xb = Tx.alloc_buffer((Q, 16, TOKENS), "int32")  # B_q[kk, n] = word 16q + kk of token n
        for q, kk, n in Tx.grid(Q, 16, TOKENS):
            xb[q, kk, n] = Tx.Select(n < N, x32[Tx.min(n, N - 1), q * 16 + kk], 0)
        inv = Tx.alloc_buffer((S, N), "float32")
        for v, n in Tx.grid(S, N):
            inv[v, n] = w_scale[v] / x_scale[n]
        for p in Tx.parallel(P):
            cfg = Tx.alloc_buffer((64,), "uint8", scope="global")
            acc = Tx.alloc_buffer((GT, ROWS, TOKENS), "int32", scope="global")
            configure(cfg, acc)
            for t in range(p * T // P, (p + 1) * T // P):
                for g in Tx.unroll(GT):
                    Tx.evaluate(call("tileloadd64", tmm(g), Tx.address_of(acc[g, 0, 0]), Tx.int64(64)))
                for q in range(Q):  # no unpacking: the weight tiles load straight from W
                    Tx.evaluate(call("tileloadd64", tmm(4), Tx.address_of(xb[q, 0, 0]), Tx.int64(64)))
                    for g in Tx.unroll(GT):
                        Tx.evaluate(call("tileloadd64", tmm(5 + g % 3), Tx.address_of(W[t * GT + g, q, 0, 0]),
                                         Tx.int64(64)))  # fmt: skip
                        Tx.evaluate(call("tdpbusd", tmm(g), tmm(5 + g % 3), tmm(4)))
                drain(y, acc, x_sum, inv, t)
            Tx.evaluate(call("tilerelease"))

    return gemm


def codes_layout(W8: np.ndarray, M: int, K: int) -> np.ndarray:
    """``tile8`` weights → one byte a code, ``[M/16, K/64, 16, 64]``."""
    rm4 = untile_rowmajor4(W8)  # [M, K/4], code j of byte b: k = 4b + j
    codes = np.stack([(rm4 >> (2 * j)) & 3 for j in range(4)], axis=-1).reshape(M, K)
    return np.ascontiguousarray(codes.reshape(M // ROWS, ROWS, K // 64, 64).transpose(0, 2, 1, 3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="calls per timing")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not has_amx():
        raise SystemExit("this CPU has no AMX-INT8")
    request_amx()
    tgt = get_target("avx512", amx=True)
    rows = []
    print(f"{'shape':34s} {'vnni µs':>16s} {'amx tile8 µs':>16s} {'amx codes µs':>16s} {'x tile8':>6s} {'x codes':>7s}")
    for N, M, K, parts in SHAPES:
        op = make_op("gemm_i8", N=N, M=M, K=K, tile=8, parts=parts)
        ins = op.random_inputs(np.random.default_rng(0))
        ref = op.reference(*ins)[0]
        W8, rest = ins[0], ins[1:]
        fns = {"vnni": get_primfunc(op, "avx512").build()["main"]}
        inputs = {"vnni": ins, "tile8": ins, "codes": [codes_layout(W8, M, K), *rest]}
        kernels = {"tile8": amx.TernaryGemmI8AMX(N, M, K, tile=8, parts=parts).kernel(num_cores()),
                   "codes": codes_kernel(N, M, K, parts, num_cores())}  # fmt: skip
        for layout, fn in kernels.items():
            fns[layout] = tvm.compile(fn.with_attr("global_symbol", "main"), target=tgt)["main"]
        args = {k: [tvm.runtime.tensor(x) for x in v] + [tvm.runtime.tensor(np.zeros((N, M), np.float32))]
                for k, v in inputs.items()}  # fmt: skip
        for k, f in fns.items():
            f(*args[k])
            if not np.array_equal(args[k][-1].numpy(), ref):
                raise SystemExit(f"{k} differs from the reference on {op.key}")
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.rounds):  # interleaved
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    f(*args[k])
                times[k].append((time.perf_counter() - t0) / a.calls * 1e6)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ratio = {k: [v / t for v, t in zip(times["vnni"], times[k], strict=True)] for k in ("tile8", "codes")}
        row = {"key": op.key, "parts": list(parts), "us": med,
               "us_range": {k: [min(v), max(v)] for k, v in times.items()},
               "vnni_over": {k: float(np.median(r)) for k, r in ratio.items()},
               "vnni_over_range": {k: [min(r), max(r)] for k, r in ratio.items()}}  # fmt: skip
        rows.append(row)
        print(f"{op.key:34s} {med['vnni']:16.1f} {med['tile8']:16.1f} {med['codes']:16.1f} "
              f"{row['vnni_over']['tile8']:6.2f} {row['vnni_over']['codes']:7.2f}")  # fmt: skip
    if a.json:
        out = {"command": "python docs/speculative/amx_gemm.py " + " ".join(argv or sys.argv[1:]),
               "machine": machine(), "git": git_commit(), "rounds": a.rounds, "calls": a.calls, "threads": num_cores(),
               "rows": rows}  # fmt: skip
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
