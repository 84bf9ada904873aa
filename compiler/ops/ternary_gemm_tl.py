"""Table-lookup ternary GEMM on 1.67-bit weights: ``gemm_i8_tl``, N tokens at once, bit-exact with ``gemm_i8``.

The ``tl{R}`` layout, tables and integer maths of :mod:`compiler.ops.ternary_gemv_tl` (the same TE, with a leading
token axis on ``x``, ``x_scale``, the tables, the sums and ``y``): each token gets its own tables (K/24 · 256 bytes),
and the schedule (:func:`schedules.x86_tl.gemm_i8_tl`) reads each 80-byte weight record once for a tile of tokens,
where prefill used to run the GEMV once per token. ``y[n, m] = float32(Σ_k w·x[n]) · (w_scale / x_scale[n])``;
no ``x_sum`` (the layout stores each row's Σ sign instead).

    python -m compiler.ops.ternary_gemm_tl     # builds the untuned TE for 3×64×1024 and checks it against numpy
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.ops.base import Arg, check_positive
from compiler.ops.stacked import n_scales
from compiler.ops.ternary_gemv_tl import TernaryGemvI8TL, TLMatrix, te_tl_matmul
from model.ternary.layouts_tl import pack_tl


@dataclass(frozen=True)
class TernaryGemmI8TL(TLMatrix):
    """``y[N, M]`` from ``tl{tile}`` weights and int8 ``x[N, K]``; ``parts``: a stacked matrix, a scale each."""

    N: int
    M: int
    K: int
    tile: int = 8
    parts: tuple[int, ...] = field(default=(), metadata={"dim": False})
    kind = "gemm_i8_tl"
    cpu_flags = TernaryGemvI8TL.cpu_flags

    def __post_init__(self):
        check_positive(N=self.N)
        self.gemv  # noqa: B018  (the GEMV's checks: K, tile, M a multiple of 16·tile, parts)

    @property
    def gemv(self) -> TernaryGemvI8TL:
        """The one-token kernel of the same matrix (decode's)."""
        return TernaryGemvI8TL(self.M, self.K, self.tile, self.parts)

    def args(self) -> list[Arg]:
        N, M, K = self.N, self.M, self.K
        return [Arg("W", self.w_shape(), "uint8"), Arg("x", (N, K), "int8"), Arg("x_scale", (N,), "float32"),
                Arg("w_scale", (n_scales(self.parts),), "float32"),
                Arg("y", (N, M), "float32", output=True)]  # fmt: skip

    def compute(self):
        return te_tl_matmul(self, self.N)

    def random_inputs(self, rng):
        codes = rng.integers(-1, 2, (self.M, self.K), dtype=np.int8)
        x = rng.integers(-127, 128, (self.N, self.K), dtype=np.int8)
        return [pack_tl(codes, self.tile), x, rng.uniform(0.5, 50, self.N).astype(np.float32),
                rng.uniform(0.01, 2, n_scales(self.parts)).astype(np.float32)]  # fmt: skip

    def ops(self) -> float:
        return 2.0 * self.N * self.M * self.K

    def two_bit_twin(self):
        """The 2-bit ``gemm_i8`` of the same shape (tile8 weights): the kernel this layout must beat."""
        from compiler.ops.ternary_gemm import TernaryGemmI8

        return TernaryGemmI8(self.N, self.M, self.K, tile=8)


if __name__ == "__main__":
    import tvm

    from targets import get_target

    op = TernaryGemmI8TL(3, 64, 1024, tile=2)
    ins = op.random_inputs(np.random.default_rng(0))
    args = [tvm.runtime.tensor(a) for a in ins + op.empty_outputs()]
    tvm.compile(op.compute(), target=get_target("auto"))["main"](*args)
    print(op, "bit-exact:", np.array_equal(args[-1].numpy(), op.reference(*ins)[0]))
