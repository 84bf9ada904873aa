"""Multi-head latent attention (DeepSeek-V2 MLA, without query compression) with a latent KV cache (PyTorch).

The attention sublayer of an MLA config (``kv_lora_rank = c > 0``), in place of :class:`model.attention.Attention`.
For ``u [B, T, d]`` at positions ``[pos, pos + T)``, ``H`` heads of ``hd = head_dim`` and ``r = qk_rope_dim``, every
projection a ternary :class:`~model.bitlinear.BitLinear`:

1. ``x = RMSNorm(u)`` (``attn_norm``);
2. ``q = W_q x`` viewed ``[B, T, H, hd + r]``: per head ``q_nope = q[:hd]``, ``q_pe = q[hd:]``;
3. ``kva = W_kv_a x`` (``[c + r]``): ``latent = RMSNorm_kv(kva[:c])`` (``attn_kv_a_norm``), ``k_pe = kva[c:]``, one
   rotary key shared by every head;
4. ``q_pe`` and ``k_pe`` are rotated by RoPE of dimension ``r`` (:func:`model.attention.apply_rope`, rotate-half);
5. the cache (:meth:`model.attention.KVCache.update_latent`) stores the float latent and the rotated ``k_pe``;
   attention then runs over every position ``[0, pos + T)``;
6. ``kv = W_kv_b latent`` viewed ``[.., H, 2·hd]``: per head ``k_nope = kv[:hd]``, ``v = kv[hd:]`` (``W_kv_b``
   quantizes each position's latent to int8 on its own, per token, as every BitLinear does);
7. ``key = [k_nope | k_pe]``, ``query = [q_nope | q_pe]``: causal softmax attention, scale ``1/sqrt(hd + r)``;
8. ``y = W_o · attn`` (``[H·hd] → d``).

The compiled module (``compiler/``) computes the same maths in absorbed form: it caches the int8 latent (with its
per-token scale) and ``k_pe`` only (``c + 4·(1 + r)`` bytes a token and layer), scores as
``(W_kb^T q_nope) · latent + q_pe · k_pe`` and outputs ``W_vb · Σ_s p_s · latent_s``, so ``W_kv_b`` never expands the
cache into per-head keys and values. GGUF names: ``attn_q``, ``attn_kv_a_mqa``, ``attn_kv_a_norm``, ``attn_kv_b``,
``attn_output`` (:mod:`model.gguf_io`).

    python -c "import torch; from model.config import get_config; from model.transformer import Transformer; \\
print(Transformer(get_config('small-mla'))(torch.zeros(1, 8, dtype=torch.long)).shape)"
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.attention import KVCache, RMSNorm, apply_rope
from model.bitlinear import BitLinear
from model.config import ModelConfig


class LatentAttention(nn.Module):
    """RMSNorm → q (ternary) and kv_a (ternary) → latent RMSNorm, RoPE on the ``r`` rotary dimensions → kv_b (ternary,
    per head key and value from the latent) → causal attention → o (ternary)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        if not config.mla:
            raise ValueError(f"LatentAttention needs kv_lora_rank > 0, got kv_lora_rank={config.kv_lora_rank}")
        self.layer = layer
        d, H, hd = config.d_model, config.n_heads, config.head_dim
        self.n_heads, self.head_dim, self.rope_dim, self.rank = H, hd, config.qk_rope_dim, config.kv_lora_rank
        self.norm = RMSNorm(d, config.norm_eps)
        self.q = BitLinear(d, H * (hd + self.rope_dim))
        self.kv_a = BitLinear(d, self.rank + self.rope_dim)
        self.kv_norm = RMSNorm(self.rank, config.norm_eps)
        self.kv_b = BitLinear(self.rank, 2 * H * hd)
        self.o = BitLinear(H * hd, d)

    def forward(
        self, u: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None, pos: int = 0
    ) -> torch.Tensor:
        """``u [B, T, d]`` at positions ``[pos, pos + T)``; ``rope`` holds the ``r``-dimensional tables for exactly
        those positions."""
        b, t, _ = u.shape
        H, hd, r, c = self.n_heads, self.head_dim, self.rope_dim, self.rank
        x = self.norm(u)
        q = self.q(x).view(b, t, H, hd + r).transpose(1, 2)  # [B, H, T, hd + r]
        q_nope, q_pe = q.split([hd, r], dim=-1)
        kva = self.kv_a(x)
        latent, k_pe = self.kv_norm(kva[..., :c]), kva[..., c:]  # [B, T, c], [B, T, r]
        q_pe, k_pe = apply_rope(q_pe, *rope), apply_rope(k_pe, *rope)
        if cache is not None:
            latent, k_pe = cache.update_latent(self.layer, pos, latent, k_pe)
        s = latent.shape[1]
        kv = self.kv_b(latent).view(b, s, H, 2 * hd).transpose(1, 2)  # [B, H, S, 2·hd]
        k_nope, v = kv.split(hd, dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, H, s, r)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if s == t:  # no cached prefix: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i (absolute position pos + i) sees keys 0 .. pos + i
            mask = torch.ones(t, s, dtype=torch.bool, device=u.device).tril(diagonal=s - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, t, H * hd))
