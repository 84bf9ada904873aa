"""Ternary GEMM on Intel AMX (``gemm_i8_amx``): ``gemm_i8`` on the same ``tile8`` weights, bit-exact, with tile
multiplies instead of VNNI dot products; a build uses it where it pays (:func:`amx_pays`: prefill chunks and decode
batches of ≥ 8 tokens over K ≥ 2048, e.g. the BitNet 2B-4T shape's).

A task is up to four 16-row groups. Per 256-code chunk ``c`` it unpacks the chunk's four 2-bit planes ``j`` (``code =
(byte >> 2j) & 3``: 64 codes of one row, ``k = 256c + 4b + j``) into 16 × 64-byte tiles in memory, one chunk ahead
of the tiles that read them (a tile load waits for the stores it reads). ``tdpbusd`` multiplies each plane's tile with
the tokens' activations ``B_{c,j}`` (signed bytes, 16 rows of 64: ``B[kk, 4n + i] = x[n, 256c + 16kk + 4i + j]``,
repacked once per call, absent tokens zero) into one int32 accumulator tile per group (``C[r, n] += Σ A[r, 4kk + i] ·
B[kk, 4n + i]``), so ``C[r, n] = Σ_k code · x[n]``: the VNNI kernels' integer sum. The epilogue is theirs, ``y[n, m]
= float32(C − Σx[n]) · (w_scale / x_scale[n])`` (the quotient computed once per part and token: the same float).

One ``tdpbusd`` is 16 rows × 16 tokens × 64 codes in ~16 cycles however many of the 16 tokens are real; VNNI needs a
``vpdpbusd`` per row, token and 64 codes. AMX pays when there are enough tokens and codes per task to cover its
fixed costs: the unpacking through memory, the accumulators' drain per task, the per-call repack
(docs/foreign_models.md, "AMX for prefill"; ``docs/speculative/amx_gemm.py`` times both against VNNI).

Needs AMX-TILE and AMX-INT8 (Intel Sapphire Rapids and later; no AMD part has them), LLVM's ``+amx-tile,+amx-int8``
(:func:`targets.target_dict` with ``amx``) and Linux's permission for the tile data (:func:`targets.cpu.request_amx`,
asked by :func:`targets.cpu.check_flags` when a kernel or a build that needs the flags is loaded).

    python -m compiler.ops.ternary_gemm_amx      # builds 4×256×512 and checks it against the reference
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.ops.base import OpShapeError
from compiler.ops.stacked import n_scales, te_part_scale
from compiler.ops.ternary_gemm import TernaryGemmI8
from targets import AMX_FLAGS

ROWS = 16  # rows of a weight tile and of an accumulator tile
TOKENS = 16  # columns of an accumulator tile: the most tokens a call takes
MIN_TOKENS, MIN_K = 8, 2048  # where the kernel pays (docs/foreign_models.md, "AMX for prefill")


def amx_pays(N: int, K: int) -> bool:
    """Whether a build takes the AMX GEMM for ``N`` tokens over ``K``: measured 1.40–2.42× the tuned VNNI GEMM at
    N = 8 and 16 on the 2B-4T shapes, 0.85–1.01× at N = 8 with K ≤ 1536 and below VNNI at N ≤ 4."""
    return MIN_TOKENS <= N <= TOKENS and K >= MIN_K


@dataclass(frozen=True)
class TernaryGemmI8AMX(TernaryGemmI8):
    """``gemm_i8`` (the same arguments and result, ``tile`` = 8) with AMX tile multiplies; see the module doc."""

    kind = "gemm_i8_amx"
    cpu_flags = AMX_FLAGS

    def __post_init__(self):
        super().__post_init__()
        if self.tile != 8:
            raise OpShapeError(f"tile = {self.tile}: the AMX GEMM reads the tile8 layout (tile = 8)")
        if self.N > TOKENS:
            raise OpShapeError(f"N = {self.N}: at most {TOKENS} tokens (an accumulator tile's columns)")
        if self.M % ROWS:
            raise OpShapeError(f"M = {self.M} must be a multiple of {ROWS} (the rows of a tile)")

    def kernel(self, cores: int | None = None):
        """The AMX kernel, scheduled by hand: a ``tvm.tirx.PrimFunc`` over :meth:`args` whose tasks split over
        ``cores`` threads (default :func:`targets.build_cores`). :meth:`compute` stays the plain TE."""
        import targets

        return amx_kernel(self, int(cores or targets.build_cores()))


def tile_op(name: str, *args):
    """The AMX instruction ``name`` (LLVM's ``llvm.x86.<name>``: ldtilecfg, tileloadd64, tdpbusd, ...) as a TIR call."""
    from tvm import tirx

    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


class _Column:
    """``inv[:, n]`` as :func:`compiler.ops.stacked.te_part_scale` indexes a scale vector."""

    def __init__(self, buf, n):
        self.buf, self.n = buf, n

    def __getitem__(self, v):
        return self.buf[v, self.n]


def groups_per_task(M: int) -> int:
    """16-row groups that share each activation tile: four (tiles 0–3 accumulate, 4 holds the activations, 5–7 the
    weights), fewer where the rows do not split into 64-row tasks."""
    return next(t for t in (4, 2, 1) if (M // ROWS) % t == 0)


def task_macros(N: int, GT: int, parts: tuple[int, ...]):
    """The two pieces every AMX GEMM task shares (also :file:`docs/speculative/amx_gemm.py`'s one-byte-code kernel),
    as TVMScript macros for ``N`` tokens and ``GT`` groups a task: ``configure(cfg, acc)``, once per thread, sets
    every tile to 16 rows × 64 bytes (LLVM renames tile registers, so they must share one shape) and zeroes the
    accumulators' memory (loaded, not ``tilezero``'d: TVM then sees ``acc`` live all along, where it gave the memory
    of a buffer only ``tilestored`` writes to another buffer); ``drain(y, acc, x_sum, inv, t)`` stores task ``t``'s
    accumulator tiles (0 … GT−1), writes its rows of ``y`` (``inv [parts, N]``: ``w_scale / x_scale``) and zeroes
    ``acc`` for the next task."""
    from tvm.script import tirx as Tx

    tmm = lambda v: Tx.Cast("int8", v)  # noqa: E731  (a tile register: the unrolled loops make it an immediate)
    scale = lambda inv, m, n: te_part_scale(_Column(inv, n), parts)(m)  # noqa: E731  (inv[part of row m, n])

    @Tx.macro
    def configure(cfg, acc):
        for v in range(64):
            cfg[v] = Tx.uint8(0)
        cfg[0] = Tx.uint8(1)  # palette 1
        for v in range(8):
            cfg[16 + 2 * v] = Tx.uint8(64)
            cfg[48 + v] = Tx.uint8(16)
        for g, r, n in Tx.grid(GT, ROWS, TOKENS):
            acc[g, r, n] = 0
        Tx.evaluate(tile_op("ldtilecfg", Tx.address_of(cfg[0])))

    @Tx.macro
    def drain(y, acc, x_sum, inv, t):
        for g in Tx.unroll(GT):
            Tx.evaluate(tile_op("tilestored64", tmm(g), Tx.address_of(acc[g, 0, 0]), Tx.int64(64)))
        for g, r, n in Tx.grid(GT, ROWS, N):
            y[n, (t * GT + g) * ROWS + r] = Tx.Cast("float32", acc[g, r, n] - x_sum[n]) * scale(
                inv, (t * GT + g) * ROWS + r, n
            )
        for g, r, n in Tx.grid(GT, ROWS, TOKENS):
            acc[g, r, n] = 0

    return configure, drain


def amx_kernel(op: TernaryGemmI8AMX, cores: int):
    from tvm.script import tirx as Tx

    N, M, K = op.N, op.M, op.K
    C, S, GT = K // 256, n_scales(op.parts), groups_per_task(M)
    T = M // (ROWS * GT)  # tasks
    P = min(T, cores)  # threads, a contiguous run of tasks each (the tile configuration once per thread)
    tmm = lambda v: Tx.Cast("int8", v)  # noqa: E731  (a tile register: the unrolled loops make it an immediate)
    configure, drain = task_macros(N, GT, op.parts)

    @Tx.macro
    def unpack(a, W, t, c, buf):  # chunk c of task t's groups → 4 planes × GT groups of 16 rows × 64 codes
        for j, g in Tx.grid(4, GT):
            for r in Tx.unroll(ROWS):
                for b in Tx.vectorized(64):
                    a[buf, j, g, r, b] = (W[(t * GT + g) * 2 + r // 8, c, r % 8, b] >> Tx.Cast("uint8", 2 * j)) & (
                        Tx.uint8(3)
                    )

    @Tx.prim_func
    def gemm(W: Tx.Buffer((M // 8, C, 8, 64), "uint8"), x: Tx.Buffer((N, K), "int8"),
             x_sum: Tx.Buffer((N,), "int32"), x_scale: Tx.Buffer((N,), "float32"),
             w_scale: Tx.Buffer((S,), "float32"), y: Tx.Buffer((N, M), "float32")):  # fmt: skip
        xb = Tx.alloc_buffer((C, 4, 16, 64), "int8")  # B_{c,j}: the activations as the tiles read them
        for c, j, kk, n, i in Tx.grid(C, 4, 16, TOKENS, 4):
            xb[c, j, kk, n * 4 + i] = Tx.Select(n < N, x[Tx.min(n, N - 1), c * 256 + kk * 16 + i * 4 + j], Tx.int8(0))
        inv = Tx.alloc_buffer((S, N), "float32")  # w_scale / x_scale, once per (part, token)
        for v, n in Tx.grid(S, N):
            inv[v, n] = w_scale[v] / x_scale[n]
        for p in Tx.parallel(P):
            cfg = Tx.alloc_buffer((64,), "uint8", scope="global")  # the tile configuration (palette 1)
            a = Tx.alloc_buffer((2, 4, GT, ROWS, 64), "uint8", scope="global")  # two chunks' unpacked planes
            acc = Tx.alloc_buffer((GT, ROWS, TOKENS), "int32", scope="global")
            configure(cfg, acc)
            t0 = p * T // P
            unpack(a, W, t0, 0, 0)
            for t in range(t0, (p + 1) * T // P):
                for g in Tx.unroll(GT):  # group g accumulates in tile g
                    Tx.evaluate(tile_op("tileloadd64", tmm(g), Tx.address_of(acc[g, 0, 0]), Tx.int64(64)))
                for c in range(C):
                    item = (t - t0) * C + c  # the thread's chunks in order: buffer item % 2
                    if c + 1 < C:
                        unpack(a, W, t, c + 1, (item + 1) % 2)
                    elif t + 1 < (p + 1) * T // P:
                        unpack(a, W, t + 1, 0, (item + 1) % 2)
                    for j in Tx.unroll(4):  # a plane's activations once (tile 4), each group's weights (5, 6, 7)
                        Tx.evaluate(tile_op("tileloadd64", tmm(4), Tx.address_of(xb[c, j, 0, 0]), Tx.int64(64)))
                        for g in Tx.unroll(GT):
                            Tx.evaluate(tile_op("tileloadd64", tmm(5 + (j * GT + g) % 3),
                                             Tx.address_of(a[item % 2, j, g, 0, 0]), Tx.int64(64)))  # fmt: skip
                            Tx.evaluate(tile_op("tdpbusd", tmm(g), tmm(5 + (j * GT + g) % 3), tmm(4)))
                drain(y, acc, x_sum, inv, t)
            Tx.evaluate(tile_op("tilerelease"))

    return gemm.without_attr("global_symbol")


if __name__ == "__main__":
    import tvm

    from targets import get_target
    from targets.cpu import check_flags

    op = TernaryGemmI8AMX(4, 256, 512, tile=8)
    check_flags(op.cpu_flags, str(op))
    ins = op.random_inputs(np.random.default_rng(0))
    args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
    tvm.compile(op.kernel().with_attr("global_symbol", "main"), target=get_target("avx512", amx=True))["main"](*args)
    print(op, "bit-exact:", np.array_equal(args[-1].numpy(), op.reference(*ins)[0]))
