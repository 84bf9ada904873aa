"""AVX-512 tensor intrinsics of the table-lookup ternary GEMV (``gemv_i8_tl``): lookups (16 rows × 24 weights), tables.

One call handles one 16-row tile × one 24-weight block: the tile's 80-byte record ``W`` (64 index bytes, byte
``p = 4r + j`` = codes j and 4 + j of row r in its two nibbles; 16 sign bytes) against the block's tables
``LUT[half, h]`` (64 bytes) (``compiler.ops.ternary_gemv_tl``), accumulating both table bytes h of all 16 rows:

    C[h, r] += Σ_{half<2, j<4} LUT[half, h, 16j + index(r, half, j)] · sign(r, half, j)

Per call: 1 load, the two index vectors ``(W >> 4·half) & 15 | 16·j`` (the nibble plus the table offset of code j;
LLVM emits ``vpternlogq``, ``vgf2p8affineqb`` and ``vporq``), 2 ``kmovq`` + 2 ``vpblendmb`` (±1 bytes from the sign
bits), 4 ``vpermb`` (64-entry byte lookups: the index picks one of the four 16-entry tables of the zmm) and 4
``vpdpbusd`` (table byte × ±1, four codes per int32 lane = row). About 16 instructions per 384 weights (80 bytes),
against 13.9 per 256 weights (64 bytes) for the 2-bit kernel; no weight is decoded. The four table registers of a
block are the same for every tile of a row group: LLVM loads them once per block when the tiles are unrolled.

``NAME[_pf{1024,2048,4096}]``: plus one ``prefetcht0 [W + pf]`` and one at ``W + pf + 64`` per call (records are
80 bytes, so one line per call would leave gaps); a grid-only knob. ``NAME_pf{1024,2048,4096}_l2``: the same
prefetches with ``prefetcht1`` (into L2 only; the knob ``prefetch_to``).

``ternary_tl_tables_4x3_avx512`` builds one (block, half)'s tables: for each of the 4 groups, ``v = Σ_g t_g·x_g`` in
16 int16 lanes (constant digit vectors × broadcast activations), then its lo and hi bytes narrowed and stored as the
two uint64 words the lookup description reads.

    python -m schedules.intrin_x86_tl      # registers the intrinsics and prints their names
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from model.ternary.layouts_tl import ZERO_CODE
from schedules.knobs import LOCALITY, PREFETCH, PREFETCH_TO, prefetch_suffix  # as the 2-bit kernel's
from schedules.tl_exprs import te_lut_word, te_term

TL_INTRIN = "ternary_tl_lookup_16x24_vnni"
LUT_INTRIN = "ternary_tl_tables_4x3_avx512"


@T.prim_func(s_tir=True)
def tl_desc(
    W: T.Buffer((80,), "uint8", offset_factor=1),
    L: T.Buffer((2, 2, 4, 2), "uint64", offset_factor=1),
    C: T.Buffer((2, 16), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:2, 0:16], W[0:80], L[0:2, 0:2, 0:4, 0:2])  # the order the block reads them
        T.writes(C[0:2, 0:16])
        for h, r, half, j in T.grid(2, 16, 2, 4):
            with T.sblock("update"):
                vh, vr, vhalf, vj = T.axis.remap("SSRR", [h, r, half, j])
                C[vh, vr] = C[vh, vr] + te_term(
                    lambda w: L[vhalf, vh, vj, w],  # noqa: B023
                    W[vr * 4 + vj], W[64 + vhalf * 8 + vr // 2], vhalf, vr % 2 * 4 + vj,
                )  # fmt: skip


def _u8(v: int):
    return tirx.Broadcast(tirx.const(v, "uint8"), 64)


def _index(W, half: int):
    """The 64 lookup indices of one half: the nibble plus the table offset ``16·(p % 4)`` of byte p."""
    nib = W.vload([0], "uint8x64")
    if half:
        nib = tirx.shift_right(nib, _u8(4))
    offset = tirx.reinterpret("uint8x64", tirx.Broadcast(tirx.const(0x30201000, "uint32"), 16))
    return tirx.reinterpret("int8x64", (nib & _u8(15)) | offset)


def _sign(W, half: int):
    """±1 bytes from the 64 sign bits at ``W[64 + 8·half]`` (one ``kmovq`` and a masked select)."""
    bits = tirx.reinterpret("uint64", W.vload([64 + 8 * half], "uint8x8"))
    mask = tirx.Cast("boolx64", tirx.reinterpret("uint1x64", bits))
    return tirx.Select(mask, tirx.Broadcast(tirx.const(-1, "int8"), 64), tirx.Broadcast(tirx.const(1, "int8"), 64))


def _acc(W, L, C, h: int):
    """C[h] + Σ_half vpdpbusd(vpermb(L[half, h], index_half), sign_half) as one expression."""
    acc = C.vload([h, 0], "int32x16")
    for half in range(2):
        table = tirx.reinterpret("int8x64", L.vload([half, h, 0, 0], "uint64x8"))
        looked = tirx.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.permvar.qi.512", table, _index(W, half))
        acc = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, looked, _sign(W, half))
    return acc


def _impl(pf: int, to: int = 1):
    prefetch = pf > 0  # a Python constant: the parser drops the prefetch when it is off
    locality = LOCALITY[to]  # into L1 (prefetcht0) or L2 (prefetcht1)

    @T.prim_func(s_tir=True)
    def impl(
        W: T.Buffer((80,), "uint8", offset_factor=1),
        L: T.Buffer((2, 2, 4, 2), "uint64", offset_factor=1),
        C: T.Buffer((2, 16), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:16], W[0:80], L[0:2, 0:2, 0:4, 0:2])  # the order the block reads them
            T.writes(C[0:2, 0:16])
            if prefetch:
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(W[pf]), 0, locality, 1))
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(W[pf + 64]), 0, locality, 1))
            C[0, T.ramp(0, 1, 16)] = _acc(W, L, C, 0)
            C[1, T.ramp(0, 1, 16)] = _acc(W, L, C, 1)

    return impl


@T.prim_func(s_tir=True)
def lut_desc(X: T.Buffer((12,), "int8", offset_factor=1), L: T.Buffer((2, 4, 2), "uint64", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(X[0:12])
        T.writes(L[0:2, 0:4, 0:2])
        for h, j, w in T.grid(2, 4, 2):
            with T.sblock("lut"):
                vh, vj, vw = T.axis.remap("SSS", [h, j, w])
                L[vh, vj, vw] = te_lut_word(lambda g: X[vj * 3 + g], vh, vw)  # noqa: B023


def _digit_vector(g: int):
    """int16x16 constant: digit g − 1 of the positive combination of code 13 + i (0 for i > 13), lane i."""
    i = tirx.Ramp(tirx.const(0, "int16"), tirx.const(1, "int16"), 16)
    b16 = lambda v: tirx.Broadcast(tirx.const(v, "int16"), 16)  # noqa: E731
    c = i + b16(ZERO_CODE)
    d = [c // b16(9), c // b16(3) % b16(3), c % b16(3)][g] - b16(1)  # LLVM folds the constant vector
    return tirx.Select(i <= b16(ZERO_CODE), d, b16(0))


def _table(X, j: int, h: int):
    """The 16 bytes of group j's table h, as uint64x2: v = Σ_g t_g·x_g in int16 lanes, then its lo or hi byte."""
    v = None
    for g in range(3):
        term = _digit_vector(g) * tirx.Broadcast(X[j * 3 + g].astype("int16"), 16)
        v = term if v is None else v + term
    if h:
        v = tirx.shift_right(v, tirx.Broadcast(tirx.const(8, "int16"), 16)) + tirx.Broadcast(tirx.const(2, "int16"), 16)
    return tirx.reinterpret("uint64x2", v.astype("uint8x16"))  # truncation keeps the lo byte


@T.prim_func(s_tir=True)
def lut_impl(X: T.Buffer((12,), "int8", offset_factor=1), L: T.Buffer((2, 4, 2), "uint64", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(X[0:12])
        T.writes(L[0:2, 0:4, 0:2])
        for j in T.unroll(4):
            L[0, j, T.ramp(0, 1, 2)] = _table(X, j, 0)
            L[1, j, T.ramp(0, 1, 2)] = _table(X, j, 1)


def intrin_name(pf: int = 0, to: int = 1) -> str:
    """The lookup intrinsic that prefetches ``pf`` bytes ahead (0: none) into cache level ``to`` (1 or 2)."""
    return TL_INTRIN + prefetch_suffix(pf, to)


def register() -> list[str]:
    """Register the intrinsics (lookup with its prefetch variants, table building; idempotent); return the names."""
    if TensorIntrin.get(LUT_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(LUT_INTRIN, lut_desc, lut_impl)
    names = [LUT_INTRIN]
    for pf in PREFETCH:
        for to in PREFETCH_TO if pf else (1,):
            name = intrin_name(pf, to)
            if TensorIntrin.get(name, allow_missing=True) is None:
                TensorIntrin.register(name, tl_desc, _impl(pf, to))
            names.append(name)
    return names


register()

if __name__ == "__main__":
    print("\n".join(register()))
