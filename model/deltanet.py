"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024): delta-rule linear attention with a fixed-size state per KV head.

The token-mixing sublayer of the DeltaNet layers of a hybrid (``full_attention_interval = n > 0``: layer ``i`` is a
DeltaNet layer when ``(i + 1) % n != 0``), in place of :class:`model.attention.Attention`. For ``u [B, T, d]``, with
``H`` query heads, ``Hk`` KV heads, ``g = H / Hk`` query heads per KV head and ``hd = head_dim``:

1. ``x = RMSNorm(u)`` (``attn_norm``);
2. ``q = W_q x`` ``[B, T, H, hd]``, ``k = W_k x`` and ``v = W_v x`` ``[B, T, Hk, hd]``, ternary
   :class:`~model.bitlinear.BitLinear` (GQA's shapes and GGUF names); no RoPE;
3. the gates read the int8 activations those matmuls read, dequantized: ``x̃ = x_q / a``
   (:func:`~model.bitlinear.quantize_activation_ste`, straight-through gradient), ``alpha_logit = W_alpha x̃`` and
   ``beta_logit = W_beta x̃`` ``[B, T, Hk]`` (float, no bias; GGUF ``ssm_alpha`` / ``ssm_beta``);
4. decay ``α = exp(−exp(A_log) · softplus(alpha_logit + dt_bias))`` ∈ (0, 1), write strength
   ``β = sigmoid(beta_logit)``, per token and KV head (GGUF ``ssm_a`` = ``A_log``, ``ssm_dt.bias``);
5. ``k̂ = k / sqrt(Σk² + 1e-6)`` per head, ``q̂`` the same per query head, then ``q̂ ← q̂ / sqrt(hd)``;
6. per KV head a state ``S [hd, hd]`` (``S[i, j]``: key dim ``i``, value dim ``j``), zero at position 0; per token
   ``S ← α S``, ``u = Sᵀ k̂``, ``S ← S + k̂ (β (v − u))ᵀ`` (the gated delta rule:
   ``S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ``), and each of its ``g`` query heads outputs
   ``o = Sᵀ q̂`` from the state after the update;
7. ``y = W_o o`` (``[H·hd] → d``).

Training uses :func:`chunk_gated_delta_rule`, the chunked parallel form (the WY / UT-transform formulation of the
Gated DeltaNet paper, as flash-linear-attention's ``chunk_gated_delta_rule`` reference, in plain PyTorch): within a
chunk of 64 tokens the new values ``Δ_r = β_r (v_r − α_r S_{r−1}ᵀ k̂_r)`` solve one unit lower-triangular system, so
the work is matmuls and only the ``T / 64`` chunk-to-chunk state updates are sequential. Decoding (one token with a
cache) runs :func:`recurrent_gated_delta_rule`, the loop above, which the tests hold as the reference; both carry
the state across chunks and across calls. The cache (:class:`model.attention.KVCache`) holds ``S [B, Hk, hd, hd]``
per DeltaNet layer (``cache.state[layer]``), whatever the length. The compiled module
(``compiler/graph_kernels_deltanet.py``) runs the recurrence token by token.

    python -c "import torch; from model.config import get_config; from model.transformer import Transformer; \\
print(Transformer(get_config('small-deltanet'))(torch.zeros(1, 8, dtype=torch.long)).shape)"
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.attention import KVCache, RMSNorm
from model.bitlinear import BitLinear, quantize_activation_ste
from model.config import ModelConfig

CHUNK = 64  # tokens per chunk of the parallel form
NORM_EPS = 1e-6  # inside the square root of q's and k's L2 norms
GATE_INIT_STD = 0.02  # W_alpha, W_beta
A_INIT_RANGE = (1.0, 16.0)  # A = exp(A_log) uniform in this range (Gated DeltaNet)
DT_INIT_RANGE = (1e-3, 0.1)  # dt = softplus(dt_bias) log-uniform in this range (Gated DeltaNet)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(Σx² + 1e-6)`` over the last dimension."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + NORM_EPS)


def _log_decay(alpha: torch.Tensor) -> torch.Tensor:
    """``log α``, with an ``α`` that underflowed to 0 read as the smallest normal float (no ``-inf`` to subtract)."""
    return torch.log(alpha.clamp_min(torch.finfo(alpha.dtype).tiny))


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token: ``q [B, T, H, dk]``, ``k [B, T, Hk, dk]``, ``v [B, T, Hk, dv]`` (q and k
    as used: the module normalizes and scales them), decay ``alpha`` and write strength ``beta`` ``[B, T, Hk]``,
    ``state [B, Hk, dk, dv]`` (None: zeros). Query heads ``h·g .. h·g + g − 1`` read KV head ``h``. Returns
    ``(o [B, T, H, dv], final state)``."""
    b, t, h, dk = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    s = q.new_zeros(b, hk, dk, dv) if state is None else state
    qg = q.view(b, t, hk, h // hk, dk)
    out = []
    for i in range(t):
        s = s * alpha[:, i, :, None, None]
        u = torch.einsum("bhij,bhi->bhj", s, k[:, i])
        s = s + k[:, i, :, :, None] * (beta[:, i, :, None] * (v[:, i] - u))[:, :, None, :]
        out.append(torch.einsum("bhij,bhgi->bhgj", s, qg[:, i]))
    o = torch.stack(out, 1) if out else q.new_zeros(b, 0, hk, h // hk, dv)
    return o.reshape(b, t, h, dv), s


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`recurrent_gated_delta_rule` (same arguments and result) in chunks of ``chunk`` tokens.

    Within a chunk, with ``γ_r = α_0 ⋯ α_r`` and ``S_0`` the state before it, the state after token ``r`` is
    ``γ_r S_0 + Σ_{s≤r} (γ_r/γ_s) k_s Δ_sᵀ`` with ``Δ_s = β_s (v_s − α_s S_{s−1}ᵀ k_s)``. Substituting gives
    ``(I + A) Δ = β v − (β γ k) S_0`` with ``A[r, s] = β_r (γ_r/γ_s) k_r·k_s`` for ``s < r``: one unit
    lower-triangular solve per chunk (the UT transform) gives ``U = (I + A)⁻¹ β v`` and ``W = (I + A)⁻¹ β γ k``, all
    chunks at once, and ``Δ = U − W S_0``. Then ``o_r = γ_r S_0ᵀ q_r + Σ_{s≤r} (γ_r/γ_s) (q_r·k_s) Δ_s`` and the next
    chunk starts from ``γ_last S_0 + Σ_s (γ_last/γ_s) k_s Δ_sᵀ``. A last partial chunk is padded with ``k = v = 0``,
    ``β = 0``, ``α = 1``, which leave the state as it is."""
    b, t, h, dk = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    g = h // hk
    n = max(1, -(-t // chunk))
    pad = n * chunk - t

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, T, Hk, ...] → [B, Hk, n, C, ...]
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(b, n, chunk, *x.shape[2:]).movedim(3, 1)

    qc = split(q.reshape(b, t, hk, g, dk)).movedim(4, 3)  # [B, Hk, n, g, C, dk]
    kc, vc, bc = split(k), split(v), split(beta)  # [B, Hk, n, C, dk], [.., dv], [B, Hk, n, C]
    gc = split(_log_decay(alpha)).cumsum(-1)  # log γ within each chunk
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    decay = torch.exp((gc[..., :, None] - gc[..., None, :]).masked_fill(~incl, -math.inf))  # γ_r / γ_s, s ≤ r
    a = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay).masked_fill(~strict, 0)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([bc[..., None] * vc, (bc * gc.exp())[..., None] * kc], dim=-1)
    uw = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    u, w = uw.split([dv, dk], dim=-1)
    scores = (qc @ kc[:, :, :, None].transpose(-1, -2)) * decay[:, :, :, None]  # [B, Hk, n, g, C, C], s ≤ r
    q_decayed = qc * gc.exp()[:, :, :, None, :, None]
    k_to_end = kc * torch.exp(gc[..., -1:] - gc)[..., None]  # k_s · γ_last / γ_s
    s = q.new_zeros(b, hk, dk, dv) if state is None else state
    out = []
    for c in range(n):
        delta = u[:, :, c] - w[:, :, c] @ s
        out.append(q_decayed[:, :, c] @ s[:, :, None] + scores[:, :, c] @ delta[:, :, None])
        s = s * gc[:, :, c, -1, None, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ delta
    o = torch.stack(out, 2)  # [B, Hk, n, g, C, dv]
    o = o.movedim(4, 3).reshape(b, hk, n * chunk, g, dv)[:, :, :t]
    return o.movedim(1, 2).reshape(b, t, h, dv), s


class GatedDeltaNet(nn.Module):
    """RMSNorm → q/k/v (ternary) and the decay/write gates (float, on the dequantized int8 input) → L2-normed q, k →
    the gated delta rule over a state per KV head (chunked, or recurrent for a single decode token) → o (ternary)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        if not config.is_deltanet(layer):
            n = config.full_attention_interval
            raise ValueError(f"layer {layer} is softmax attention, not DeltaNet (full_attention_interval={n})")
        self.layer = layer
        d, hk = config.d_model, config.n_kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, hk, config.head_dim
        self.norm = RMSNorm(d, config.norm_eps)
        self.q = BitLinear(d, d)
        self.k = BitLinear(d, config.kv_dim)
        self.v = BitLinear(d, config.kv_dim)
        self.o = BitLinear(d, d)
        self.w_alpha = nn.Parameter(torch.randn(hk, d) * GATE_INIT_STD)
        self.w_beta = nn.Parameter(torch.randn(hk, d) * GATE_INIT_STD)
        self.A_log = nn.Parameter(torch.empty(hk).uniform_(*A_INIT_RANGE).log())
        lo, hi = np.log(DT_INIT_RANGE)
        dt = torch.empty(hk).uniform_(float(lo), float(hi)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decay ``α`` and write strength ``β`` ``[B, T, Hk]`` from the normed input ``x`` (quantized to int8 as the
        ternary matmuls quantize it, then dequantized; a float layer, :func:`train.train.set_dense`, reads ``x``)."""
        if self.q.quantize:
            xq, a = quantize_activation_ste(x)
            x = xq / a.unsqueeze(-1)
        w_alpha, w_beta, a_log, dt_bias = (p.to(x.dtype) for p in (self.w_alpha, self.w_beta, self.A_log, self.dt_bias))
        alpha = torch.exp(-torch.exp(a_log) * F.softplus(F.linear(x, w_alpha) + dt_bias))
        return alpha, torch.sigmoid(F.linear(x, w_beta))

    def forward(
        self, u: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None, pos: int = 0
    ) -> torch.Tensor:
        """``u [B, T, d]`` following ``pos`` tokens (the state of which ``cache`` holds; position 0 starts from zeros);
        ``rope`` is ignored (no positional rotation: the recurrence is ordered)."""
        b, t, _ = u.shape
        H, hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        x = self.norm(u)
        q = self.q(x).view(b, t, H, hd)
        k = self.k(x).view(b, t, hk, hd)
        v = self.v(x).view(b, t, hk, hd)
        # the gates, norms and state in float32 at least, whatever autocast does to the matmuls around them
        out_dtype, dtype = v.dtype, torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(u.device.type, enabled=False):
            alpha, beta = self.gates(x.to(dtype))
            q, k, v = l2norm(q.to(dtype)) / math.sqrt(hd), l2norm(k.to(dtype)), v.to(dtype)
            state = cache.state[self.layer].to(dtype) if cache is not None and pos > 0 else None
            rule = recurrent_gated_delta_rule if cache is not None and t == 1 else chunk_gated_delta_rule
            o, state = rule(q, k, v, alpha, beta, state)
        if cache is not None:
            cache.state[self.layer].copy_(state)
        return self.o(o.to(out_dtype).reshape(b, t, H * hd))
