"""Knobs: the tunable choices of a hand schedule, either fixed (a dict) or sampled (a MetaSchedule design space).

Every schedule function in ``schedules/`` has the signature ``fn(sch, op, knobs=None)``. It asks for each choice
through :func:`choose`: with ``knobs`` given, the fixed value is used (the "manual" schedule, and the grid search of
``compiler.tune``); with ``knobs=None`` the choice becomes ``sch.sample_categorical`` so the same function, wrapped in
``ms.space_generator.ScheduleFn``, is a MetaSchedule design space whose decisions the search explores.

Candidates depend only on the static shape (e.g. row tiles must divide M: the kernels have no tail loop, so an M
that is not a multiple of 8 gets tile 4, 2 or 1 — correct for every M, fastest for the model's multiples of 256).

    python -c "from schedules.knobs import divisors_in; print(divisors_in(1536, (1, 2, 4, 8, 16)))"
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

PREFETCH = (0, 1024, 2048, 4096)  # x86 kernels' software prefetch distance in bytes ahead of the chunk (0 = none)
PREFETCH_TO = (1, 2)  # the cache level a prefetch fills: 1 (prefetcht0) or 2 (prefetcht1: L2, not L1)
LOCALITY = {1: 3, 2: 2}  # PREFETCH_TO -> llvm.prefetch's locality argument (3: prefetcht0, 2: prefetcht1)


def prefetch_suffix(pf: int, to: int = 1) -> str:
    """An x86 intrinsic's name suffix for a prefetch ``pf`` bytes ahead (0: none) into cache level ``to``:
    ``""``, ``"_pf2048"`` (L1) or ``"_pf2048_l2"``."""
    return (f"_pf{pf}" + (f"_l{to}" if to != 1 else "")) if pf else ""


def duplicate_prefetch(knobs: dict) -> bool:
    """A cache level chosen for no prefetch: the same kernel as ``prefetch_to = 1`` (the tuner skips it)."""
    return int(knobs.get("prefetch", 1)) == 0 and int(knobs.get("prefetch_to", 1)) != 1


@dataclass(frozen=True)
class Knob:
    """A named choice. ``grid_only`` knobs pick between *different instruction sequences* (e.g. which intrinsic to
    tensorize with), which a replayed MetaSchedule trace cannot switch: in a sampled design space they stay at
    their default; the grid search (``compiler.tune``) still explores them."""

    name: str
    candidates: tuple[int, ...]
    default: int
    grid_only: bool = False

    def __post_init__(self):
        if not self.candidates:
            raise ValueError(f"knob {self.name}: no candidate fits this shape")
        if self.default not in self.candidates:  # the preferred value does not fit: take the largest that does
            object.__setattr__(self, "default", max(c for c in self.candidates if c <= max(self.candidates)))


def divisors_in(n: int, options) -> tuple[int, ...]:
    """The options that divide ``n`` (so a split by them is perfect)."""
    return tuple(o for o in options if n % o == 0)


def knob(name: str, n: int, options, default: int, grid_only: bool = False) -> Knob:
    """A knob over the ``options`` that divide ``n``; ``default`` if it fits, else the largest fitting one."""
    cands = divisors_in(n, options)
    return Knob(name, cands, default if default in cands else max(cands), grid_only)


def choose(sch, knobs: dict | None, k: Knob):
    """The knob's value as a ``sample_categorical`` instruction (a single candidate is returned as a plain int).

    With ``knobs`` given the decision is fixed to ``knobs[k.name]`` (missing names take the default), so the schedule
    trace records the chosen value as a decision: tuning records carry their knobs, and :func:`knobs_of_trace` reads
    them back. With ``knobs=None`` the decision is left to the sampler (MetaSchedule design space).
    """
    if len(k.candidates) == 1 or (knobs is None and k.grid_only):
        return k.default if knobs is None else int(knobs.get(k.name, k.default))
    probs = [1.0 / len(k.candidates)] * len(k.candidates)
    if knobs is None:
        return sch.sample_categorical(list(k.candidates), probs)
    v = int(knobs.get(k.name, k.default))
    if v not in k.candidates:
        raise ValueError(f"knob {k.name}={v} is not one of {k.candidates} for this shape")
    return sch.sample_categorical(list(k.candidates), probs, decision=k.candidates.index(v))


def knobs_of_trace(trace, space: list[Knob]) -> dict[str, int]:
    """The knob values a schedule trace decided, in :func:`choose` call order (single-candidate knobs implied;
    a trace from a sampled design space has no grid-only decisions: those were at their defaults; nor has a grid
    trace recorded before grid-only knobs were appended to the space: those read as their defaults too)."""
    decisions = [
        int(trace.get_decision(inst)) for inst in trace.insts if inst.kind.name == "SampleCategorical"
    ]  # fmt: skip
    full = [k for k in space if len(k.candidates) > 1]
    sampled = full
    if len(decisions) != len(sampled):
        sampled = [k for k in full if not k.grid_only]
    if len(decisions) != len(sampled) and all(k.grid_only for k in full[len(decisions) :]):
        sampled = full[: len(decisions)]  # a grid trace from before trailing grid-only knobs existed: defaults
    if len(decisions) != len(sampled):
        raise ValueError(f"trace has {len(decisions)} categorical decisions, the knob space {len(sampled)}")
    out = {k.name: k.default for k in space}
    out.update({k.name: k.candidates[d] for k, d in zip(sampled, decisions, strict=True)})
    return {k.name: out[k.name] for k in space}


def defaults(space: list[Knob]) -> dict[str, int]:
    return {k.name: k.default for k in space}


def grid(space: list[Knob]) -> list[dict[str, int]]:
    """Every combination, the defaults first."""
    first = defaults(space)
    combos = [dict(zip([k.name for k in space], vals, strict=True))
              for vals in itertools.product(*[k.candidates for k in space])]  # fmt: skip
    return [first] + [c for c in combos if c != first]
