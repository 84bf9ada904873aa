"""GaLore for the hidden matrices: Muon whose momentum lives in a rank-``r`` subspace of each gradient.

Low-rank gradient projection (Zhao et al. 2024, "GaLore"; GaLore 2, Su et al. 2025: randomized SVD, subspace
refresh at scale). For a matrix ``W`` (``rows × cols``) let ``a = min(rows, cols)`` and ``G`` its gradient, turned so
that it is ``a × b`` (``a ≤ b``; the short side is the one projected). Every ``update_every`` steps (and at the first)
the projector ``P`` (``a × r``, orthonormal columns) is refreshed from the current gradient:
the top-``r`` left singular vectors by a randomized range finder (Gaussian sketch of ``r + 8`` columns, two power
iterations, QR, an SVD of the small ``(r + 8) × b`` matrix), batched over same-shape matrices like
``train.muon.BatchedMuon``. Each step then

    R = Pᵀ G                      (r × b, the projected gradient)
    M ← μ M + (1 − μ) R           (the momentum, kept only in the subspace: r × b instead of a × b)
    O = NS(Nesterov(R, M))        (Muon's Newton–Schulz orthogonalisation, on the small matrix)
    W ← W − lr · α · max(1, rows/cols)^½ · P O

Why Muon's momentum and not Adam's moments in the subspace: the hidden matrices train with Muon here, so GaLore keeps
the same update rule and learning rates and differs only in the space; and Muon's state is linear in the gradient, so
it can be carried across a subspace change exactly. On a refresh the old momentum (``P_old M``, a full ``a × b``
matrix) is projected into the new subspace, ``M ← (P_newᵀ P_old) M``: the part inside the new subspace is kept and the
part outside, which could never again influence an update, is dropped. (Adam's second moment is not linear, so the
same move would be a guess; GaLore resets or keeps it.) ``P O`` has ``r`` unit singular values where Muon's full
update has ``a``; ``α`` (``--galore-scale``) rescales it. On the tiny preset (80 steps, docs/train/optim/README.md)
rank 64 trailed Muon by 0.22 nats with α = 1 and by 0.055 with α = 2.

State per parameter: ``projector`` (a × r), ``momentum_buffer`` (r × b), ``step``; the sketch's Gaussian comes from a
generator seeded by (``seed``, step, shape), so nothing random needs checkpointing and a resumed run is bit-identical.
Memory per matrix: ``r·(a + b)`` floats instead of ``a·b`` (rank 64 on the tiny preset's 256-wide matrices: 44 % of
Muon's momentum).

    python -m train.train --preset tiny --data data/shards --out runs/galore --optimizer galore --galore-rank 64
"""

from __future__ import annotations

import torch

from train.muon import BatchedMuon, orthogonalize_shared

OVERSAMPLE = 8
POWER_ITERS = 2


def top_subspace(g: torch.Tensor, rank: int, generator: torch.Generator, oversample: int = OVERSAMPLE,
                 power_iters: int = POWER_ITERS) -> torch.Tensor:  # fmt: skip
    """Orthonormal bases ``[batch, a, rank]`` of the top-``rank`` left singular subspaces of ``g [batch, a, b]``
    (randomized range finder, Halko et al. 2011, algorithm 4.4 + 5.1)."""
    batch, a, b = g.shape
    width = min(rank + oversample, a)
    sketch = torch.randn(batch, b, width, generator=generator, device=g.device, dtype=g.dtype)
    y = g @ sketch
    for _ in range(power_iters):
        y = g @ (g.mT @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q  # [batch, a, width]
    u, _, _ = torch.linalg.svd(q.mT @ g, full_matrices=False)
    return q @ u[..., :rank]


class GaLoreMuon(BatchedMuon):
    """:class:`train.muon.BatchedMuon` with the momentum in a rank-``rank`` subspace refreshed every
    ``update_every`` steps (see the module docstring)."""

    def __init__(self, params, rank: int = 64, update_every: int = 100, scale: float = 1.0, seed: int = 0,
                 **kwargs) -> None:  # fmt: skip
        if rank < 1 or update_every < 1:
            raise ValueError(f"GaLore needs rank ≥ 1 and update_every ≥ 1, got {rank} and {update_every}")
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.update(rank=rank, update_every=update_every, scale=scale, seed=seed)

    def _direction(self, group: dict, params: list[torch.Tensor], grads: torch.Tensor) -> torch.Tensor:
        rows, cols = params[0].shape
        g = grads.mT if rows > cols else grads  # [count, a, b], a ≤ b
        rank = min(group["rank"], g.shape[1])
        states = [self.state[p] for p in params]
        for st in states:
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
        stale = [i for i, st in enumerate(states) if int(st["step"]) % group["update_every"] == 0]
        if stale:
            self._refresh(group, [states[i] for i in stale], g[stale], rank)
        proj = torch.stack([st["projector"] for st in states])  # [count, a, r]
        low = proj.mT @ g  # [count, r, b]
        buf = torch.stack([st["momentum_buffer"] for st in states])
        buf.lerp_(low, 1 - group["momentum"])
        update = low.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
        ortho = proj @ orthogonalize_shared(update, group["ns_steps"]).to(proj.dtype)
        for i, st in enumerate(states):
            st["momentum_buffer"].copy_(buf[i])
            st["step"] += 1
        ortho = ortho.mT if rows > cols else ortho
        return ortho * group["scale"] if group["scale"] != 1 else ortho

    def _refresh(self, group: dict, states: list[dict], g: torch.Tensor, rank: int) -> None:
        """New projectors from the gradients ``g [k, a, b]``; the momentum is carried into the new subspace."""
        step = int(states[0]["step"])
        gen = torch.Generator(device=g.device)
        gen.manual_seed(hash((group["seed"], step, *g.shape[1:])) & 0x7FFF_FFFF_FFFF_FFFF)
        new = top_subspace(g.float(), rank, gen).to(g.dtype)
        for i, st in enumerate(states):
            if "projector" in st:
                st["momentum_buffer"] = (new[i].mT @ st["projector"]) @ st["momentum_buffer"]
            else:
                st["momentum_buffer"] = torch.zeros(rank, g.shape[2], dtype=g.dtype, device=g.device)
            st["projector"] = new[i].contiguous()
