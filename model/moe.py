"""Mixture-of-experts FFN (PyTorch): a float router sends each token to the top ``k`` of ``E`` ternary SwiGLU experts.

Per token ``u``: ``x = RMSNorm(u)``; ``logits = router(x)`` in float32 (the router is a float ``[E, d]`` matrix, not
ternary); the ``k = n_experts_used`` experts with the largest logits, in descending order (equal logits: the lower
index first); weights ``w = softmax`` of those ``k`` logits (the full softmax renormalised over them); and
``y = Σ_j w_j · expert_{e_j}(x)`` summed over the slots ``j = 0 … k-1`` in that order. An expert is
``down(silu(gate(x)) · up(x))`` with ternary :class:`~model.bitlinear.BitLinear` gate, up and down, each quantizing
its input itself (every expert of a token sees the same ``x``). The compiled graph computes the same from the GGUF
tensors ``ffn_gate_inp`` (the router) and ``ffn_{gate,up,down}_exps`` (the stacked experts, :mod:`model.gguf_io`).

Each expert runs once per forward, on the tokens routed to it only (gathered, then written back to their slots).
Every forward also leaves in ``aux_loss`` the Switch-Transformer load-balancing loss ``E · Σ_e f_e · P_e``
(``f_e``: the fraction of the ``(token, slot)`` assignments that go to expert ``e``; ``P_e``: the router's mean
probability of ``e``; exactly 1 when either is uniform), and the assignments per expert in ``last_load``.

    python -c "import torch; from model.config import get_config; from model.moe import MoEFFN; \\
print(MoEFFN(get_config('tiny', n_experts=4))(torch.randn(1, 3, 256)).shape)"
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.attention import RMSNorm
from model.bitlinear import BitLinear
from model.config import ModelConfig

ROUTER_INIT_STD = 0.02


def top_experts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest logits' indices per row, in descending order, equal logits lower index first (a stable sort:
    ``torch.topk`` does not order ties)."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]


def balance_loss(probs: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E · Σ_e f_e · P_e, assignments per expert)`` from the router probabilities ``probs [N, E]`` and the chosen
    experts ``top [N, k]``; only ``P_e`` (the mean of ``probs``) carries a gradient."""
    n_experts = probs.shape[-1]
    load = torch.bincount(top.flatten(), minlength=n_experts)
    f = load.to(probs.dtype) / top.numel()
    return n_experts * (f * probs.mean(0)).sum(), load


class Expert(nn.Module):
    """One SwiGLU expert: ``down(silu(gate(x)) · up(x))``, all three ternary."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = BitLinear(d_model, hidden)
        self.up = BitLinear(d_model, hidden)
        self.down = BitLinear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoEFFN(nn.Module):
    """RMSNorm → float router → the weighted sum of the top ``n_experts_used`` of ``n_experts`` experts (see the module
    docstring); ``aux_loss`` and ``last_load`` are set by every forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.n_experts:
            raise ValueError(f"config {config.name!r} has no experts (n_experts = 0)")
        self.k = config.n_experts_used
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD)
        self.experts = nn.ModuleList(Expert(config.d_model, config.ffn_hidden) for _ in range(config.n_experts))
        self.aux_loss: torch.Tensor | None = None  # scalar: the load-balancing loss of the last forward
        self.last_load: torch.Tensor | None = None  # int64 [E]: (token, slot) assignments per expert, no gradient

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens ``x [N, d]``: the router probabilities ``[N, E]``, the chosen experts ``[N, k]`` and their
        weights ``[N, k]``, in float32 whatever the model's dtype or autocast."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        top = top_experts(logits, self.k)
        return logits.softmax(-1), top, logits.gather(-1, top).softmax(-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = self.norm(u)
        flat = x.reshape(-1, x.shape[-1])
        n, k = flat.shape[0], self.k
        probs, top, weights = self.route(flat)
        self.aux_loss, self.last_load = balance_loss(probs, top)
        experts, weights = top.flatten(), weights.flatten()  # (token, slot) pair p is token p // k, slot p % k
        parts = flat.new_zeros(n * k, flat.shape[-1])
        for e, expert in enumerate(self.experts):
            pairs = (experts == e).nonzero().squeeze(1)  # may be empty: the expert still joins the graph (DDP)
            out = expert(flat.index_select(0, pairs // k))
            parts.index_copy_(0, pairs, (weights[pairs, None] * out).to(parts.dtype))
        parts = parts.view(n, k, -1)
        y = parts[:, 0]
        for j in range(1, k):  # slot by slot, in order: the compiled graph's summation order
            y = y + parts[:, j]
        return y.view_as(x)
