"""Causal grouped-query attention with rotary position embeddings and a KV cache (PyTorch).

The sublayer ``F`` of an mHC attention site: ``F(u) = W_o · attn(RoPE(W_q n), RoPE(W_k n), W_v n)`` with
``n = RMSNorm(u)`` and every projection a ternary :class:`~model.bitlinear.BitLinear` (q, k and v quantize the same
normed input, so a runtime may quantize it once). RoPE is the GPT-NeoX "rotate half" form: dimension ``i < h/2`` is
paired with ``i + h/2`` and rotated by ``pos · θ^(-2i/h)``. ``n_heads / n_kv_heads`` query heads share each K/V head.

A :class:`KVCache` holds the keys and values of every layer for ``[0, pos)``; calling the model on new tokens with a
cache appends them, so decoding one token at a time equals the full-sequence forward.

    python -c "from model.attention import KVCache; print(KVCache.__doc__)"
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.bitlinear import BitLinear
from model.config import ModelConfig


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dimension."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[max_len, head_dim / 2]`` (angles computed in float64, stored float32)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, hd]`` by the tables ``[T, hd/2]`` (rotate-half pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Keys and values per layer, preallocated ``[B, n_kv_heads, max_len, head_dim]``; ``pos`` tokens are valid."""

    def __init__(
        self, config: ModelConfig, batch: int = 1, max_len: int | None = None, device=None, dtype=torch.float32
    ) -> None:
        self.max_len = max_len or config.max_seq_len
        shape = (batch, config.n_kv_heads, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.pos = 0

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, H, T, hd]`` at ``[pos, pos + T)`` of ``layer``; return everything in ``[0, pos + T)``."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """RMSNorm → q/k/v (ternary) → RoPE → causal GQA → [sub-norm, arch "bitnet"] → o (ternary)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.q = BitLinear(config.d_model, config.d_model)
        self.k = BitLinear(config.d_model, config.kv_dim)
        self.v = BitLinear(config.d_model, config.kv_dim)
        self.o = BitLinear(config.d_model, config.d_model)
        self.sub_norm = RMSNorm(config.d_model, config.norm_eps) if config.sub_norms else None

    def forward(
        self, u: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None, pos: int = 0
    ) -> torch.Tensor:
        """``u [B, T, d]`` at positions ``[pos, pos + T)``; ``rope`` holds the tables for exactly those positions."""
        b, t, _ = u.shape
        x = self.norm(u)
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)
        gqa = self.n_heads != self.n_kv_heads
        if gqa and torch.onnx.is_in_onnx_export():  # the ONNX exporter cannot convert SDPA's enable_gqa
            group = self.n_heads // self.n_kv_heads
            k, v, gqa = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
        if k.shape[2] == t:  # no cached prefix: plain causal attention (lets SDPA pick its flash kernel)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # query i (absolute position pos + i) sees keys 0 .. pos + i
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=u.device).tril(diagonal=k.shape[2] - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.o(y if self.sub_norm is None else self.sub_norm(y))
