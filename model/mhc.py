"""mHC-lite residual routing in PyTorch: n parallel residual streams mixed by a doubly stochastic matrix.

The one definition of the residual update used in training, export and (via :mod:`model.mhc_static`) the compiled
runtime — see ``docs/mhc.md``. Per site with sublayer ``F`` (attention or FFN) and streams ``X`` (n × d)::

    u  = Σ_s h_pre[s] · X[s]                 # aggregate the streams into the sublayer input
    X' = H_res · X + h_post ⊗ F(u)           # paper order (mHC eq. 3); never H_res · (X + h_post ⊗ F(u))

``H_res`` is built exactly (no Sinkhorn): n = 2 closed form ``[[a, 1-a], [1-a, a]]``, n = 4 a softmax-weighted sum of
the 24 permutation matrices of S4 (Birkhoff–von Neumann). n = 1 is the plain residual ``x + F(x)`` (ablations).
Expand at the input (every stream = the embedding), mean-collapse at the output.

Initialisation breaks the stream symmetry (Hyper-Connections): ``h_pre`` logits +1 on stream ``site mod n`` and -1
elsewhere, ``H_res ≈ I`` (n = 2: ``alpha_logit = 3``; n = 4: identity logit 0, the others -8), ``h_post = 1``.

    python -c "from model.mhc import MHCSite; print(MHCSite(4, 1).coefficients())"
"""

from __future__ import annotations

import torch
from torch import nn

from model.mhc_static import MHCCoefficients, permutation_matrices, res_logits_size

INIT_ALPHA_LOGIT = 3.0  # n = 2: sigmoid(3) ≈ 0.95 on the diagonal
INIT_OFF_IDENTITY_LOGIT = -8.0  # n = 4: weight of each non-identity permutation ≈ e^-8 / (1 + 23 e^-8)
INIT_PRE_LOGIT = 1.0  # h_pre ≈ 0.73 on the site's own stream, 0.27 elsewhere

_PERMS4 = torch.from_numpy(permutation_matrices(4))


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(0.5 * x))  # same formula as model.mhc_static, so the float32 results agree


def h_res_from_logits(res_logits: torch.Tensor, n: int) -> torch.Tensor:
    """Exact doubly stochastic ``H_res`` (float64, differentiable) from its logits (shape ``[1]`` or ``[24]``)."""
    res = res_logits.double()
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64, device=res.device)
    if n == 2:
        a = _sigmoid(res[0])
        return torch.stack([torch.stack([a, 1.0 - a]), torch.stack([1.0 - a, a])])
    w = torch.exp(res - res.max().detach())
    w = w / w.sum()
    return torch.einsum("k,kij->ij", w, _PERMS4.to(res.device))


def expand(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., d]`` → ``[..., n, d]``: every stream starts as the embedding."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


def collapse(streams: torch.Tensor) -> torch.Tensor:
    """``[..., n, d]`` → ``[..., d]``: the mean of the streams."""
    return streams.mean(dim=-2)


def aggregate(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """``u = h_preᵀ X = Σ_s h_pre[s] · X[s]`` for ``X [..., n, d]`` (summed in stream order)."""
    u = h_pre[0] * streams[..., 0, :]
    for s in range(1, streams.shape[-2]):
        u = u + h_pre[s] * streams[..., s, :]
    return u


def apply_update(streams: torch.Tensor, y: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor) -> torch.Tensor:
    """``X' = H_res · X + h_post ⊗ y`` for ``X [..., n, d]``, ``y [..., d]``.

    The sums over the n ≤ 4 streams are unrolled into elementwise multiply-adds. An einsum lowers to a bmm with a tiny
    inner dimension (slow on GPUs, and autocast runs it in bf16, rounding the residual streams), and a broadcast
    ``.sum()`` becomes a reduction kernel; unrolled, ``torch.compile`` fuses the site into pointwise kernels (the
    measured speed-up: docs/architecture.md, "Measurements behind the code").
    """
    n = streams.shape[-2]
    rows = []
    for i in range(n):
        acc = h_res[i, 0] * streams[..., 0, :]
        for j in range(1, n):
            acc = acc + h_res[i, j] * streams[..., j, :]
        rows.append(acc + h_post[i] * y)
    return torch.stack(rows, dim=-2)


class MHCSite(nn.Module):
    """The static mHC-lite parameters of one site (``site`` = 2·block + 0 for attention, + 1 for the FFN)."""

    def __init__(self, n: int, site: int) -> None:
        super().__init__()
        self.n = n
        n_res = res_logits_size(n)
        if n == 1:
            return
        pre = torch.full((n,), -INIT_PRE_LOGIT)
        pre[site % n] = INIT_PRE_LOGIT
        res = torch.full((n_res,), INIT_OFF_IDENTITY_LOGIT) if n == 4 else torch.full((1,), INIT_ALPHA_LOGIT)
        if n == 4:
            res[0] = 0.0
        self.pre_logits = nn.Parameter(pre)
        self.post_logits = nn.Parameter(torch.zeros(n))
        self.res_logits = nn.Parameter(res)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h_pre [n], h_post [n], H_res [n, n])`` computed in float64 and rounded once to the parameters' dtype."""
        dtype = self.pre_logits.dtype
        h_pre = _sigmoid(self.pre_logits.double()).to(dtype)
        h_post = (2.0 * _sigmoid(self.post_logits.double())).to(dtype)
        return h_pre, h_post, h_res_from_logits(self.res_logits, self.n).to(dtype)

    def forward(self, streams: torch.Tensor, sublayer) -> torch.Tensor:
        """One residual site: ``streams [..., n, d]`` and ``sublayer: [..., d] → [..., d]``."""
        if self.n == 1:
            x = streams[..., 0, :]
            return (x + sublayer(x)).unsqueeze(-2)
        h_pre, h_post, h_res = self.weights()
        u = aggregate(streams, h_pre)
        return apply_update(streams, sublayer(u), h_res, h_post)

    @torch.no_grad()
    def coefficients(self) -> MHCCoefficients:
        """The static coefficients as numpy float32, as the compiler consumes them."""
        if self.n == 1:
            one = torch.ones(1)
            h_pre, h_post, h_res = one, one, one.reshape(1, 1)
        else:
            h_pre, h_post, h_res = self.weights()
        return MHCCoefficients(*(t.float().cpu().numpy() for t in (h_pre, h_post, h_res)))

    def logits(self) -> dict[str, torch.Tensor]:
        """The raw parameters by name (empty for n = 1): what the GGUF file stores."""
        if self.n == 1:
            return {}
        return {"pre_logits": self.pre_logits, "post_logits": self.post_logits, "res_logits": self.res_logits}

    def extra_repr(self) -> str:
        return f"n={self.n}"
