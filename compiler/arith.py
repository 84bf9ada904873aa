"""What :mod:`model.exact_reference` must know about a CPU build to repeat its float32 arithmetic exactly.

Every kernel of the CPU graph computes a token's row in a fixed order except ``rmsnorm_quant``, whose ``Σx²`` runs in
``vec`` vector lanes — a tuned knob, so the decode (one token) and prefill (a chunk) kernels may differ. This reads
the knob of the schedule a build uses (the best tuning record of ``tuning_logs/<target>/``, else the hand schedule's
default), exactly as :func:`compiler.schedule.get_primfunc` picks it.

    python -m compiler.arith --model models/small.gguf --target avx512
"""

from __future__ import annotations

import argparse

from compiler import schedule as S
from compiler.lower import PREFILL_CHUNK
from compiler.ops import make_op
from model.exact_reference import Arith


def norm_lanes(D: int, N: int, target: str, logs_root=None) -> int:
    """The ``vec`` knob of ``rmsnorm_quant:D:N`` as built for ``target``."""
    op = make_op("rmsnorm_quant", D=D, N=N)
    return int(S.build_knobs(op, target, logs_root)["vec"])


def arith_of(cfg, target: str, logs_root=None, chunk: int = PREFILL_CHUNK) -> Arith:
    """The :class:`~model.exact_reference.Arith` of a build of ``cfg`` for a CPU ``target``."""
    if target == "cuda":
        raise ValueError("model.exact_reference mirrors the CPU kernels only")
    d, f = cfg.d_model, cfg.ffn_hidden
    lanes = [norm_lanes(D, N, target, logs_root) for D in (d, f) for N in (1, chunk)]
    return Arith(*lanes)


def main(argv=None) -> None:
    from model.gguf_io import read_gguf
    from targets import resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--target", default="auto")
    a = p.parse_args(argv)
    print(arith_of(read_gguf(a.model, check_values=False).config, resolve(a.target)))


if __name__ == "__main__":
    main()
