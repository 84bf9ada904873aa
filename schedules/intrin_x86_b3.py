"""AVX-512 VNNI tensor intrinsic for the base-3 ternary GEMV (``gemv_i8_b3``): 64 bytes = 320 codes per call.

One call handles one weight row × one 320-code chunk: 64 packed bytes ``W[b]`` (5 trits each, TQ1_0 byte code)
against the chunk's activations ``X[j, b] = x[320c + 64j + b]`` (j < 5), accumulating into two sets of 16 int32
lanes (lane l collects bytes 4l..4l+3, the 4-byte group of ``vpdpbusd``):

    C[0, l] += Σ_{t<4, j<5} q_j(W[4l+t]) · X[j, 4l+t]        q_j(w) = w·3^j mod 256
    C[1, l] += Σ_{t<4, j<5} q_{j+1}(W[4l+t]) · X[j, 4l+t]

so that ``(3·C[0] − C[1]) / 256`` is the exact digit dot product (the op's epilogue; see
:mod:`compiler.ops.ternary_gemv_b3`). No digit is ever extracted: ``q_{j+1} = q_j + 2·q_j`` is two ``vpaddb``
(byte adds wrap mod 256, exactly the base-3 shift), and the bytes q go straight into ``vpdpbusd`` as the unsigned
operand. Per 64 bytes: 1 load, 5 × (doubling + ``vpaddb``), 10 ``vpdpbusd`` — 21 instructions with GFNI (the 2-bit
kernel: 1 load, 3 shifts, 4 ANDs, 4 ``vpdpbusd`` per 64 bytes, 256 codes instead of 320).

``NAME[_gfni][_pf{1024,2048,4096}]``: the doubling by ``vgf2p8affineqb`` (GFNI: Ice Lake, Zen 4) or by a masked 16-bit
shift; one ``prefetcht0 [W + pf]`` per chunk (grid-only knobs, as the 2-bit prefetch).

    python -m schedules.intrin_x86_b3      # registers the intrinsics and prints their names
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from compiler.ops.ternary_gemv_b3 import te_terms

B3_VNNI_INTRIN = "ternary_b3_dot_64b_vnni"
PREFETCH = (0, 1024, 2048, 4096)


@T.prim_func(s_tir=True)
def b3_dot_desc(
    W: T.Buffer((64,), "uint8", offset_factor=1),
    X: T.Buffer((5, 64), "int8", offset_factor=1),
    C: T.Buffer((2, 16), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:2, 0:16], W[0:64], X[0:5, 0:64])
        T.writes(C[0:2, 0:16])
        for s, ln, t in T.grid(2, 16, 4):
            with T.sblock("update"):
                vl, vs, vt = T.axis.remap("SSR", [ln, s, t])  # block-var order of the rfactor block
                C[vs, vl] = C[vs, vl] + te_terms(W[vl * 4 + vt], lambda j: X[j, vl * 4 + vt], vs)  # noqa: B023


GF2_SHL1 = 0x0001020408102040  # vgf2p8affineqb bit matrix of "shift each byte left by 1"


def _times3(q, gfni: bool):
    """``3·q mod 256`` per byte, as ``q + 2q`` with the doubling hidden from LLVM: written as ``q + (q << 1)`` on
    bytes, LLVM folds the chain into byte multiplies by 3^j, which x86 lacks (vpmaddubsw + vpmullw + vpermt2b each).

    ``gfni``: the doubling is one ``vgf2p8affineqb`` (a per-byte bit matrix; opaque to LLVM) → 2 ops per plane.
    Otherwise a 16-bit shift with the bit that crossed a byte boundary masked off (``(q <<₁₆ 1) & 0xFEFE``) → 3 ops.
    """
    if gfni:
        a = tirx.reinterpret("int8x64", tirx.Broadcast(tirx.const(GF2_SHL1, "int64"), 8))
        dbl = tirx.call_llvm_pure_intrin("int8x64", "llvm.x86.vgf2p8affineqb.512", tirx.reinterpret("int8x64", q), a,
                                         tirx.const(0, "int8"))  # fmt: skip
        return q + tirx.reinterpret("uint8x64", dbl)
    w16 = tirx.reinterpret("uint16x32", q)
    dbl = tirx.shift_left(w16, tirx.Broadcast(tirx.const(1, "uint16"), 32)) & tirx.Broadcast(
        tirx.const(0xFEFE, "uint16"), 32
    )
    return q + tirx.reinterpret("uint8x64", dbl)


def _planes(W, gfni: bool):
    """q_0..q_5 as uint8x64 expressions: q_0 = the bytes, q_{j+1} = 3·q_j mod 256 (wrapping byte arithmetic)."""
    q = [W.vload([0], "uint8x64")]
    for _ in range(5):
        q.append(_times3(q[-1], gfni))
    return q


def _dot(W, X, C, s: int, gfni: bool):
    """C[s] + Σ_j vpdpbusd(q_{j+s}, X[j]) as one expression (no let-bound vectors: see intrin_x86)."""
    q = _planes(W, gfni)
    acc = C.vload([s, 0], "int32x16")
    for j in range(5):
        acc = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                         tirx.reinterpret("int8x64", q[j + s]), X.vload([j, 0], "int8x64"))  # fmt: skip
    return acc


def _impl(pf: int, gfni: bool):
    prefetch = pf > 0  # a Python constant: the parser drops the prefetch when it is off

    @T.prim_func(s_tir=True)
    def impl(
        W: T.Buffer((64,), "uint8", offset_factor=1),
        X: T.Buffer((5, 64), "int8", offset_factor=1),
        C: T.Buffer((2, 16), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:16], W[0:64], X[0:5, 0:64])
            T.writes(C[0:2, 0:16])
            if prefetch:
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(W[pf]), 0, 3, 1))
            C[0, T.ramp(0, 1, 16)] = _dot(W, X, C, 0, gfni)
            C[1, T.ramp(0, 1, 16)] = _dot(W, X, C, 1, gfni)

    return impl


def intrin_name(pf: int = 0, gfni: bool = False) -> str:
    return B3_VNNI_INTRIN + ("_gfni" if gfni else "") + (f"_pf{pf}" if pf else "")


def register() -> list[str]:
    """Register the intrinsic and its (prefetch, gfni) variants (idempotent); return the names."""
    names = []
    for gfni in (False, True):
        for pf in PREFETCH:
            name = intrin_name(pf, gfni)
            if TensorIntrin.get(name, allow_missing=True) is None:
                TensorIntrin.register(name, b3_dot_desc, _impl(pf, gfni))
            names.append(name)
    return names


register()

if __name__ == "__main__":
    print("\n".join(register()))
