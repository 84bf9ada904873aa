"""Muon with the Newton–Schulz orthogonalisation batched over matrices of the same shape.

Same update as ``torch.optim.Muon`` (momentum with Nesterov, 5 quintic Newton–Schulz steps in bf16 with the
coefficients (3.4445, −4.7750, 2.0315), learning rate scaled by ``max(1, rows/cols)^½``, decoupled weight decay),
but a transformer's hidden matrices come in a handful of shapes (q/o, k/v, gate/up, down), so stacking each shape
into one ``[count, rows, cols]`` tensor turns ~15 small matmuls per matrix into ~15 batched ones per shape. On the
``small`` preset that is 60 kernel launches a step instead of ~850, which is where its training time went.

Under DDP (``torch.distributed`` initialised, world size ``W > 1``) every rank holds the same all-reduced gradients
and momentum, so the orthogonalisation, the only costly part, is split: rank ``r`` runs Newton–Schulz on its
``1/W`` share of each shape's stack and an all-gather assembles the rest (:func:`orthogonalize_shared`; the
approach of Keller Jordan's distributed Muon). Each matrix's result is computed exactly as alone, so every rank
applies the same update, equal to the single-process one.

State per parameter: ``momentum_buffer`` (a plain ``Optimizer`` state dict, so checkpoints and exact resume work).
``train.optim8.Muon8bit`` keeps it in 8 bits and ``train.galore.GaLoreMuon`` in a low-rank subspace; both override the
hooks :meth:`BatchedMuon._direction` / ``_load_momentum`` / ``_store_momentum``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximate ``U Vᵀ`` of each matrix in ``g [batch, rows, cols]`` (quintic Newton–Schulz, in ``dtype``)."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if transposed else x


def orthogonalize_shared(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """:func:`orthogonalize` of ``g [batch, rows, cols]``, the batch split over the ranks of the default process
    group (when one is initialised with more than one rank; else computed here alone): rank ``r`` orthogonalises
    matrices ``r·k .. (r+1)·k − 1`` of the batch padded with zero matrices to a multiple ``W·k`` of the world size,
    and an all-gather gives every rank all of them. Every rank must call it with the same ``g`` (as DDP ranks do
    after the gradient all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2 or len(g) < 2:
        return orthogonalize(g, steps)
    world, rank = dist.get_world_size(), dist.get_rank()
    k = -(-len(g) // world)
    mine = g[rank * k : (rank + 1) * k]
    if len(mine) < k:  # the last ranks' shares past the batch: zero matrices (orthogonalised to zero, then dropped)
        mine = torch.cat([mine, g.new_zeros((k - len(mine), *g.shape[1:]))])
    part = orthogonalize(mine, steps).contiguous()
    out = part.new_empty((world * k, *part.shape[1:]))
    dist.all_gather_into_tensor(out, part)
    return out[: len(g)]


class BatchedMuon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5) -> None:  # fmt: skip
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns_steps": ns_steps}  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            for (rows, cols), params in by_shape.items():
                ortho = self._direction(group, params, torch.stack([p.grad for p in params])).to(params[0].dtype)
                lr = group["lr"] * max(1.0, rows / cols) ** 0.5
                for i, p in enumerate(params):
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(ortho[i], alpha=-lr)
        return loss

    def _direction(self, group: dict, params: list[torch.Tensor], grads: torch.Tensor) -> torch.Tensor:
        """The orthogonalised update ``[count, rows, cols]`` of same-shape ``params`` from their stacked ``grads``
        (consumed); advances the momentum. Subclasses change its storage (``train.optim8``) or its space
        (``train.galore``)."""
        buf = self._load_momentum(params)
        buf.lerp_(grads, 1 - group["momentum"])
        update = grads.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
        ortho = orthogonalize_shared(update, group["ns_steps"])
        self._store_momentum(params, buf)
        return ortho

    def _load_momentum(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The momentum buffers of ``params``, stacked (a copy: :meth:`_store_momentum` writes it back)."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return torch.stack([self.state[p]["momentum_buffer"] for p in params])

    def _store_momentum(self, params: list[torch.Tensor], buf: torch.Tensor) -> None:
        for i, p in enumerate(params):
            self.state[p]["momentum_buffer"].copy_(buf[i])
