"""The operator unit (T-MAC style): a TE compute, a numpy reference, random inputs, cost figures, a workload key.

Each operator module in :mod:`compiler.ops` defines one :class:`Op` subclass; per-target schedules live in
``schedules/``: each target's module (``schedules.x86_avx512``, ``x86_avx2``, ``cuda``) has a ``SCHEDULES`` dict keyed
by :attr:`Op.kind`, and :func:`compiler.schedule.schedule_module` picks the module by target name. An op instance is a
*workload*: the kind plus its static shape; :attr:`Op.key` is the stable string used as the tuning-log key.

    python -c "from compiler.ops import make_op; print(make_op('gemv_i8', M=4096, K=4096))"
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from model.ternary.checks import QK


class OpShapeError(ValueError):
    """A shape that an operator cannot take (K not a multiple of 256, a non-positive size, ...)."""


def check_positive(**dims: int) -> None:
    for name, v in dims.items():
        if not isinstance(v, int | np.integer) or v <= 0:
            raise OpShapeError(f"{name} = {v!r} must be a positive integer")


def check_k(k: int) -> None:
    if k % QK:
        raise OpShapeError(f"K = {k} must be a multiple of {QK} (the TQ2_0 block, and the kernels' 256-code chunk)")


@dataclass(frozen=True)
class Arg:
    """One parameter of the compiled function: name, shape, dtype, and whether the kernel writes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    output: bool = False


@dataclass(frozen=True)
class Op:
    """Base class: subclasses are frozen dataclasses whose fields are the static shape (``M``, ``K``, ...)."""

    kind = "abstract"

    # --- what subclasses implement ---------------------------------------------------------------------------
    def args(self) -> list[Arg]:
        raise NotImplementedError

    def compute(self):
        """The ``tvm.tirx.PrimFunc`` (``te.create_prim_func``) whose parameters follow :meth:`args`."""
        raise NotImplementedError

    def reference(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """The outputs (numpy) for the inputs (numpy), in :meth:`args` order: the truth the kernels are tested on."""
        raise NotImplementedError

    def random_inputs(self, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError

    def tolerances(self, *inputs: np.ndarray) -> list[float]:
        """Absolute tolerance per output vs :meth:`reference` (0 = bit-exact, the default: the integer paths)."""
        return [0.0] * len(self.outputs())

    def ops(self) -> float:
        """Arithmetic operations per call (2 per multiply-add), for GOPS."""
        raise NotImplementedError

    def bytes_moved(self) -> float:
        """Bytes the kernel must read + write at least once per call, for GB/s and the roofline."""
        return float(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.args()))

    # --- shared -----------------------------------------------------------------------------------------------
    @property
    def dims(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("dim", True)}

    def canonical(self) -> Op:
        """This op with its non-dimension fields (``metadata={"dim": False}``, e.g. a norm's epsilon) at their
        defaults: the workload its tuning records are stored under — such fields change a constant, not the
        schedule."""
        return replace(self, **{f.name: f.default for f in fields(self) if not f.metadata.get("dim", True)})

    @property
    def key(self) -> str:
        """``kind:dim=value:...``, e.g. ``gemv_i8:M=4096:K=4096`` — the tuning-log and cache key."""
        return ":".join([self.kind] + [f"{k}={v}" for k, v in self.dims.items()])

    @property
    def func_name(self) -> str:
        """A C-symbol-safe name after kind, shape and dtype, e.g. ``ternary_gemv_i8_M4096_K4096``."""
        return "ternary_" + self.kind + "".join(f"_{k}{v}" for k, v in self.dims.items())

    def inputs(self) -> list[Arg]:
        return [a for a in self.args() if not a.output]

    def outputs(self) -> list[Arg]:
        return [a for a in self.args() if a.output]

    def empty_outputs(self) -> list[np.ndarray]:
        return [np.zeros(a.shape, a.dtype) for a in self.outputs()]

    def __str__(self) -> str:
        return self.key
