"""x86 tensor intrinsics for the ternary dot product: decode 2-bit codes in registers, multiply with int8 activations.

One intrinsic call handles one weight row × one 256-code chunk: 64 packed bytes ``W[b]`` (code ``j`` of byte ``b`` is
``(W[b] >> 2j) & 3`` ∈ {0, 1, 2}) against the chunk's activations in the *k-interleaved* layout ``X[j, b] =
x[4b + j]`` (see :func:`compiler.ops.ternary_gemv.ternary_gemv_compute`), accumulating into 16 int32 lanes:

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

The int32 accumulator is exact while ``K ≤ 2²²`` (``|Σ c·x| ≤ 2·128·K``), the bound
:data:`model.ternary.reference.K_MAX` already enforces.

    python -m schedules.intrin_x86          # registers the intrinsics and prints their names
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

LANES = 16  # int32 accumulator lanes per intrinsic call
CHUNK_BYTES = 64  # packed weight bytes per call
CHUNK = 4 * CHUNK_BYTES  # codes per call (256 = one TQ2_0 block)

VNNI_INTRIN = "ternary_dot_64b_vnni"
AVX512BW_INTRIN = "ternary_dot_64b_avx512bw"
AVX2_INTRIN = "ternary_dot_64b_avx2"


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


@T.prim_func(s_tir=True)
def ternary_dot_vnni(
    W: T.Buffer((64,), "uint8", offset_factor=1),
    X: T.Buffer((4, 64), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], W[0:64], X[0:4, 0:64])
        T.writes(C[0:16])
        w = T.reinterpret(W.vload([0], "uint8x64"), dtype="int16x32")
        m = T.broadcast(T.int16(0x0303), 32)
        c0 = T.reinterpret(w & m, dtype="int8x64")
        c1 = T.reinterpret(T.shift_right(w, T.broadcast(T.int16(2), 32)) & m, dtype="int8x64")
        c2 = T.reinterpret(T.shift_right(w, T.broadcast(T.int16(4), 32)) & m, dtype="int8x64")
        c3 = T.reinterpret(T.shift_right(w, T.broadcast(T.int16(6), 32)) & m, dtype="int8x64")
        acc = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], "int32x16"),
            c0,
            X.vload([0, 0], "int8x64"),
            dtype="int32x16",
        )
        acc = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            acc,
            c1,
            X.vload([1, 0], "int8x64"),
            dtype="int32x16",
        )
        acc = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            acc,
            c2,
            X.vload([2, 0], "int8x64"),
            dtype="int32x16",
        )
        acc = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            acc,
            c3,
            X.vload([3, 0], "int8x64"),
            dtype="int32x16",
        )
        C[T.ramp(0, 1, 16)] = acc


@T.prim_func(s_tir=True)
def ternary_dot_avx512bw(
    W: T.Buffer((64,), "uint8", offset_factor=1),
    X: T.Buffer((4, 64), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], W[0:64], X[0:4, 0:64])
        T.writes(C[0:16])
        w = T.reinterpret(W.vload([0], "uint8x64"), dtype="int16x32")
        m = T.broadcast(T.int16(0x0303), 32)
        p0 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"),
            T.reinterpret(w & m, dtype="int8x64"),
            X.vload([0, 0], "int8x64"),
            dtype="int16x32",
        )
        p1 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"),
            T.reinterpret(T.shift_right(w, T.broadcast(T.int16(2), 32)) & m, dtype="int8x64"),
            X.vload([1, 0], "int8x64"),
            dtype="int16x32",
        )
        p2 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"),
            T.reinterpret(T.shift_right(w, T.broadcast(T.int16(4), 32)) & m, dtype="int8x64"),
            X.vload([2, 0], "int8x64"),
            dtype="int16x32",
        )
        p3 = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"),
            T.reinterpret(T.shift_right(w, T.broadcast(T.int16(6), 32)) & m, dtype="int8x64"),
            X.vload([3, 0], "int8x64"),
            dtype="int16x32",
        )
        C[T.ramp(0, 1, 16)] = C.vload([0], "int32x16") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddw.d.512"),
            p0 + p1 + p2 + p3,
            T.broadcast(T.int16(1), 32),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def ternary_dot_avx2(
    W: T.Buffer((64,), "uint8", offset_factor=1),
    X: T.Buffer((4, 64), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], W[0:64], X[0:4, 0:64])
        T.writes(C[0:16])
        m = T.broadcast(T.int16(0x0303), 16)
        for h in T.unroll(2):  # two 32-byte halves → lanes 8h .. 8h+7
            w = T.reinterpret(W.vload([h * 32], "uint8x32"), dtype="int16x16")
            p0 = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(w & m, dtype="int8x32"),
                X.vload([0, h * 32], "int8x32"),
                dtype="int16x16",
            )
            p1 = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.shift_right(w, T.broadcast(T.int16(2), 16)) & m, dtype="int8x32"),
                X.vload([1, h * 32], "int8x32"),
                dtype="int16x16",
            )
            p2 = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.shift_right(w, T.broadcast(T.int16(4), 16)) & m, dtype="int8x32"),
                X.vload([2, h * 32], "int8x32"),
                dtype="int16x16",
            )
            p3 = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.shift_right(w, T.broadcast(T.int16(6), 16)) & m, dtype="int8x32"),
                X.vload([3, h * 32], "int8x32"),
                dtype="int16x16",
            )
            C[T.ramp(h * 8, 1, 8)] = C.vload([h * 8], "int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                p0 + p1 + p2 + p3,
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )


def _register(name: str, impl) -> str:
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, ternary_dot_desc, impl)
    return name


def register() -> tuple[str, str, str]:
    """Register the three intrinsics (idempotent) and return their names."""
    return (
        _register(VNNI_INTRIN, ternary_dot_vnni),
        _register(AVX512BW_INTRIN, ternary_dot_avx512bw),
        _register(AVX2_INTRIN, ternary_dot_avx2),
    )


register()

if __name__ == "__main__":
    print("\n".join(register()))
