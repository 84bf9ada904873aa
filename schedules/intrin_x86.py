"""x86 tensor intrinsics for the ternary dot product: decode 2-bit codes in registers, multiply with int8 activations.

One intrinsic call handles one weight row × one 256-code chunk: 64 packed bytes ``W[b]`` (code ``j`` of byte ``b`` is
``(W[b] >> 2j) & 3`` ∈ {0, 1, 2}) against the chunk's activations in the *k-interleaved* layout ``X[j, b] =
x[4b + j]`` (the ``Xt`` stage of :mod:`compiler.ops.ternary_gemv`), accumulating into 16 int32 lanes:

    C[l] += Σ_{t<4, j<4} code(W[4l + t], j) · X[j, 4l + t]        (l < 16)

Lane ``l`` collects bytes ``4l..4l+3`` — exactly the 4-byte group of ``vpdpbusd`` — so the four code planes
``(W >> 2j) & 0x03`` (one 16-bit shift + one AND each, over all 64 bytes at once) line up with the four 64-byte rows
``X[j, :]`` without any shuffle. The codes are the *unsigned* operand and x the signed one, which is why the kernel
computes ``Σ code·x − Σ x`` (the caller subtracts Σx).

* ``ternary_dot_64b_vnni`` (AVX-512 VNNI): 1 load, 3 shifts, 4 ANDs, 4 ``vpdpbusd`` per 256 codes.
* ``ternary_dot_64b_avx2`` (AVX2): two 256-bit halves; per half, 4 × ``vpmaddubsw`` (u8·s8 → pairwise int16 sums),
  3 × ``vpaddw``, 1 × ``vpmaddwd`` by ones (→ int32) and 1 × ``vpaddd``.
  **int16 saturation bound**: ``vpmaddubsw`` saturates a pair sum ``c₀x₀ + c₁x₁`` to int16; with ``c ≤ 2`` and
  ``|x| ≤ 128`` a pair is at most ``2·2·128 = 512``, and the sum of the four planes is at most ``4·512 = 2048``, far
  below 32767, so nothing saturates for any int8 input (even −128, which the quantizer never emits).
* ``ternary_dot_64b_avx512bw`` (AVX-512BW without VNNI): the AVX2 recipe on 512-bit registers.

Each also exists as ``NAME_pf{1024,2048,4096}``: the same body plus one software prefetch ``W + pf`` bytes ahead
(a grid-only knob of the GEMV schedule; it matters for DRAM-resident weights) into L1 (``prefetcht0``), and as
``NAME_pf{1024,2048,4096}_l2`` into L2 only (``prefetcht1``; the knob ``prefetch_to``). Bodies are single
expressions, not let-bound vectors: inside a parallel loop TVM turns each let-bound vector into a workspace
allocation per call.

The int32 accumulator is exact while ``K ≤ 2²²`` (``|Σ c·x| ≤ 2·128·K``), the bound
:data:`model.ternary.reference.K_MAX` already enforces.

    python -m schedules.intrin_x86          # registers the intrinsics and prints their names
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from schedules.knobs import LOCALITY, PREFETCH, PREFETCH_TO, prefetch_suffix  # prefetch distances and levels

LANES = 16  # int32 accumulator lanes per intrinsic call
CHUNK_BYTES = 64  # packed weight bytes per call
CHUNK = 4 * CHUNK_BYTES  # codes per call (256 = one TQ2_0 block)

VNNI_INTRIN = "ternary_dot_64b_vnni"
AVX512BW_INTRIN = "ternary_dot_64b_avx512bw"
AVX2_INTRIN = "ternary_dot_64b_avx2"


# The intrinsic bodies are built as single expressions by these helpers (called from TVMScript): a let-bound vector
# in an intrinsic body becomes a workspace *allocation* per call once the body sits inside a parallel loop
# (TVMBackendAllocWorkspace, measured 2x slower end to end), while a pure expression stays in registers.
def _plane(w16, j: int, lanes16: int):
    """Code plane j of packed bytes viewed as int16 lanes: ``(w >> 2j) & 0x0303`` reinterpreted as bytes."""
    mask = tirx.Broadcast(tirx.const(0x0303, "int16"), lanes16)
    v = w16 if j == 0 else tirx.shift_right(w16, tirx.Broadcast(tirx.const(2 * j, "int16"), lanes16))
    return tirx.reinterpret(f"int8x{2 * lanes16}", v & mask)


def _vnni_expr(W, X, C):
    w16 = tirx.reinterpret("int16x32", W.vload([0], "uint8x64"))
    acc = C.vload([0], "int32x16")
    for j in range(4):
        acc = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, _plane(w16, j, 32),
                                         X.vload([j, 0], "int8x64"))  # fmt: skip
    return acc


def _maddubs_expr(W, X, C, offset: int, nbytes: int):
    """``C[lanes] + pmaddwd(Σ_j pmaddubsw(plane_j, X[j]), 1)`` over ``nbytes`` (32: AVX2, 64: AVX-512BW)."""
    lanes16, lanes32 = nbytes // 2, nbytes // 4
    ubsw = "llvm.x86.avx512.pmaddubs.w.512" if nbytes == 64 else "llvm.x86.avx2.pmadd.ub.sw"
    wd = "llvm.x86.avx512.pmaddw.d.512" if nbytes == 64 else "llvm.x86.avx2.pmadd.wd"
    w16 = tirx.reinterpret(f"int16x{lanes16}", W.vload([offset], f"uint8x{nbytes}"))
    pairs = None
    for j in range(4):
        p = tirx.call_llvm_pure_intrin(f"int16x{lanes16}", ubsw, _plane(w16, j, lanes16),
                                       X.vload([j, offset], f"int8x{nbytes}"))  # fmt: skip
        pairs = p if pairs is None else pairs + p  # |Σ of 4 pair sums| ≤ 2048: no int16 overflow (module doc)
    ones = tirx.Broadcast(tirx.const(1, "int16"), lanes16)
    return C.vload([offset // 4], f"int32x{lanes32}") + tirx.call_llvm_pure_intrin(f"int32x{lanes32}", wd, pairs, ones)


@T.prim_func(s_tir=True)
def ternary_dot_desc(
    W: T.Buffer((64,), "uint8", offset_factor=1),
    X: T.Buffer((4, 64), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], W[0:64], X[0:4, 0:64])
        T.writes(C[0:16])
        for ln, t, j in T.grid(16, 4, 4):
            with T.sblock("update"):
                vl, vt, vj = T.axis.remap("SRR", [ln, t, j])
                C[vl] = C[vl] + T.Cast("int32", (W[vl * 4 + vt] >> T.Cast("uint8", vj * 2)) & T.uint8(3)) * T.Cast(
                    "int32", X[vj, vl * 4 + vt]
                )


def _impl(isa: str, pf: int, to: int = 1):
    """The implementation PrimFunc for ``isa`` (vnni | avx512bw | avx2), prefetching ``W + pf`` bytes if ``pf`` into
    cache level ``to``."""
    locality = LOCALITY[to]
    lo = {"vnni": _vnni_expr, "avx512bw": lambda W, X, C: _maddubs_expr(W, X, C, 0, 64),
          "avx2": lambda W, X, C: _maddubs_expr(W, X, C, 0, 32)}[isa]  # fmt: skip
    hi = lambda W, X, C: _maddubs_expr(W, X, C, 32, 32)  # noqa: E731  (AVX2: the upper 32 bytes → lanes 8..15)
    n = 8 if isa == "avx2" else 16

    prefetch, avx2 = pf > 0, isa == "avx2"  # Python constants: the parser drops the branches not taken

    @T.prim_func(s_tir=True)
    def impl(
        W: T.Buffer((64,), "uint8", offset_factor=1),
        X: T.Buffer((4, 64), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], W[0:64], X[0:4, 0:64])
            T.writes(C[0:16])
            if prefetch:
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(W[pf]), 0, locality, 1))
            if avx2:
                C[T.ramp(0, 1, 8)] = lo(W, X, C)
                C[T.ramp(8, 1, 8)] = hi(W, X, C)
            else:
                C[T.ramp(0, 1, n)] = lo(W, X, C)

    return impl


def _shuffle(vectors, idx: list[int]):
    return tirx.Shuffle(vectors, [tirx.const(i, "int32") for i in idx])


def _lane_sums(vectors: list):
    """``R`` int32x16 vectors (``R`` a power of two ≤ 16) → one int32x``R`` vector of their lane sums, by a
    transposed tree: each level adds the two halves of every row's partial sums, two vectors at a time, until one
    vector holds ``R`` rows × ``16 / R`` partials, which then fold within it (``log2(16)`` adds in all, against
    ``log2(16)`` per row for a horizontal sum of each)."""
    partials, lanes, vs = 16, 16, list(vectors)
    while len(vs) > 1:
        half = partials // 2
        lo = [i for i in range(2 * lanes) if i % lanes % partials < half]
        hi = [i for i in range(2 * lanes) if i % lanes % partials >= half]
        vs = [_shuffle([a, b], lo) + _shuffle([a, b], hi) for a, b in zip(vs[0::2], vs[1::2], strict=True)]
        partials = half
    v = vs[0]
    while partials > 1:
        half = partials // 2
        v = _shuffle([v], [i for i in range(lanes) if i % partials < half]) + _shuffle(
            [v], [i for i in range(lanes) if i % partials >= half])  # fmt: skip
        partials, lanes = half, lanes // 2
    return v


LANE_SUM_ROWS = (2, 4, 8)  # row tiles whose cross-lane sums are one tensorized tree (lane_sum_intrin)


def lane_sum_intrin(rows: int) -> str:
    """The name of the intrinsic ``C[r] += Σ_l A[r, l]`` over a row tile's ``rows × 16`` int32 accumulators."""
    return f"ternary_lane_sum_{rows}"


def _lane_sum_pair(rows: int):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((rows, 16), "int32", offset_factor=1), C: T.Buffer((rows,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(C[0:rows], A[0:rows, 0:16])
            T.writes(C[0:rows])
            for m, ln in T.grid(rows, 16):
                with T.sblock("update"):
                    vl = T.axis.reduce(16, ln)  # the block's own order: lanes first (the rfactor's acc block)
                    vm = T.axis.spatial(rows, m)
                    C[vm] = C[vm] + A[vm, vl]

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((rows, 16), "int32", offset_factor=1), C: T.Buffer((rows,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(C[0:rows], A[0:rows, 0:16])
            T.writes(C[0:rows])
            C[T.ramp(0, 1, rows)] = C[T.ramp(0, 1, rows)] + _lane_sums([A.vload([m, 0], "int32x16")
                                                                         for m in range(rows)])  # fmt: skip

    return desc, impl


def intrin_name(base: str, pf: int = 0, to: int = 1) -> str:
    """The intrinsic that prefetches ``pf`` bytes ahead (0: none) into cache level ``to`` (1 or 2)."""
    return base + prefetch_suffix(pf, to)


def register() -> list[str]:
    """Register every (ISA, prefetch distance) intrinsic (idempotent) and return the names.

    The prefetch variants issue one ``prefetcht0 [W + pf]`` (or ``prefetcht1``) per 64-byte chunk: for a
    DRAM-resident GEMV the hardware prefetcher alone leaves bandwidth unused (measured: docs/architecture.md,
    "Measurements behind the code"; the cache level: docs/foreign_models.md, "Prefetching into L2").
    """
    names = []
    for base, isa in ((VNNI_INTRIN, "vnni"), (AVX512BW_INTRIN, "avx512bw"), (AVX2_INTRIN, "avx2")):
        for pf in PREFETCH:
            for to in PREFETCH_TO if pf else (1,):
                name = intrin_name(base, pf, to)
                if TensorIntrin.get(name, allow_missing=True) is None:
                    TensorIntrin.register(name, ternary_dot_desc, _impl(isa, pf, to))
                names.append(name)
    for rows in LANE_SUM_ROWS:
        name = lane_sum_intrin(rows)
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *_lane_sum_pair(rows))
        names.append(name)
    return names


register()
from schedules import intrin_x86_tl  # noqa: E402,F401  (the 1.67-bit GEMV's intrinsics: tuning records name them too)

if __name__ == "__main__":
    print("\n".join(register()))
