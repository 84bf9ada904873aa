"""Causal grouped-query attention with rotary position embeddings and a KV cache (PyTorch).

The sublayer ``F`` of an mHC attention site: ``F(u) = W_o · attn(RoPE(W_q n), RoPE(W_k n), W_v n)`` with
``n = RMSNorm(u)`` and every projection a ternary :class:`~model.bitlinear.BitLinear` (q, k and v quantize the same
normed input, so a runtime may quantize it once). RoPE is the GPT-NeoX "rotate half" form: dimension ``i < h/2`` is
paired with ``i + h/2`` and rotated by ``pos · θ^(-2i/h)``. ``n_heads / n_kv_heads`` query heads share each K/V head.

A :class:`KVCache` holds the keys and values of every layer for ``[0, pos)`` (for multi-head latent attention,
:mod:`model.mla`, the latent and the rotated shared key instead; for a gated DeltaNet layer, :mod:`model.deltanet`,
a fixed-size recurrent state); calling the model on new tokens with a cache appends them, so decoding one token at a
time equals the full-sequence forward.

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


CACHE_TIME_DIM = {"k": 2, "v": 2, "latent": 1, "k_pe": 1}  # the position axis of each cache kind (a state has none)


class KVCache:
    """Per layer, preallocated for ``max_len`` positions of which ``pos`` are valid: GQA keys and values
    ``k, v [B, n_kv_heads, max_len, head_dim]``, or for multi-head latent attention (:mod:`model.mla`) the normed
    latent ``latent [B, max_len, kv_lora_rank]`` and the rotated shared key ``k_pe [B, max_len, qk_rope_dim]``. In a
    gated DeltaNet hybrid (:mod:`model.deltanet`) a DeltaNet layer has no keys and values (``k[layer]`` is None) but
    a recurrent state ``state[layer] [B, n_kv_heads, head_dim, head_dim]`` (float32 at least), the same size at any
    ``max_len``; ``state[layer]`` is None for the softmax layers. ``state`` exists only in hybrids.

    ``pad [B]`` (None: no row is padded) holds, for a batch of prompts of different lengths that share one position
    counter, how many positions each row was left-padded by: row ``b``'s positions ``[0, pad[b])`` are never attended
    to. Its tokens sit ``pad[b]`` positions later than alone, which RoPE's scores do not see (they depend on the
    distance between positions only), so each row computes what it would alone, up to float rounding. GQA models
    only (``Transformer.hidden`` refuses it for MLA, whose attention takes no mask, and DeltaNet, whose recurrence
    would read the padding)."""

    def __init__(
        self, config: ModelConfig, batch: int = 1, max_len: int | None = None, device=None, dtype=torch.float32
    ) -> None:
        self.max_len = max_len or config.max_seq_len
        self.mla = config.mla

        def zeros(*shape: int, dtype=dtype, keep=lambda layer: True) -> list[torch.Tensor | None]:
            return [torch.zeros(shape, device=device, dtype=dtype) if keep(i) else None for i in range(config.n_layers)]

        if self.mla:
            self.latent = zeros(batch, self.max_len, config.kv_lora_rank)
            self.k_pe = zeros(batch, self.max_len, config.qk_rope_dim)
        else:
            softmax = lambda layer: not config.is_deltanet(layer)  # noqa: E731
            self.k = zeros(batch, config.n_kv_heads, self.max_len, config.head_dim, keep=softmax)
            self.v = zeros(batch, config.n_kv_heads, self.max_len, config.head_dim, keep=softmax)
        if config.deltanet_layers:  # a reduced-precision cache (bf16 under autocast) still sums the state in float32
            hd, state_dtype = config.head_dim, torch.promote_types(dtype, torch.float32)
            self.state = zeros(batch, config.n_kv_heads, hd, hd, dtype=state_dtype, keep=config.is_deltanet)
        self.pos = 0
        self.pad: torch.Tensor | None = None
        self._mask: tuple | None = None  # (pad, (t, keys, device), mask) of attention_mask's last call

    def _end(self, pos: int, t: int) -> int:
        if pos + t > self.max_len:
            raise ValueError(f"KV cache overflow: {pos + t} positions > max_len {self.max_len}")
        return pos + t

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, H, T, hd]`` at ``[pos, pos + T)`` of ``layer``; return everything in ``[0, pos + T)``."""
        end = self._end(pos, k.shape[2])
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def update_latent(
        self, layer: int, pos: int, latent: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA: store ``latent [B, T, c]`` and ``k_pe [B, T, r]`` at ``[pos, pos + T)`` of ``layer``; return
        everything in ``[0, pos + T)``."""
        end = self._end(pos, latent.shape[1])
        self.latent[layer][:, pos:end] = latent
        self.k_pe[layer][:, pos:end] = k_pe
        return self.latent[layer][:, :end], self.k_pe[layer][:, :end]

    def _layers(self) -> dict[str, list[torch.Tensor | None]]:
        kinds = ("latent", "k_pe") if self.mla else ("k", "v")
        return {kind: getattr(self, kind) for kind in (*kinds, "state") if hasattr(self, kind)}

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """The cache's tensors by kind (``k``/``v`` or ``latent``/``k_pe``, and ``state`` in a DeltaNet hybrid), one
        per layer that has that kind, in layer order; batch is dimension 0."""
        out = {kind: [t for t in layers if t is not None] for kind, layers in self._layers().items()}
        return {kind: ts for kind, ts in out.items() if ts}

    def fill_from(self, other: KVCache) -> None:
        """Copy ``other``'s ``other.pos`` valid positions (and its states) into every row (one prompt's cache to a
        batch)."""
        n = other.pos
        for kind, mine in self.tensors().items():
            time = CACHE_TIME_DIM.get(kind)
            for dst, src in zip(mine, other.tensors()[kind], strict=True):
                if time is None:
                    dst.copy_(src)  # broadcasts over the batch
                else:
                    dst.narrow(time, 0, n).copy_(src.narrow(time, 0, n))
        self.pos = n

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (in that order)."""
        for kind, layers in self._layers().items():
            setattr(self, kind, [None if t is None else t.index_select(0, index) for t in layers])
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index.to(self.pad.device))

    def repeat_rows(self, n: int) -> None:
        """Each batch row ``n`` times in place (row ``b`` becomes rows ``b·n .. b·n + n − 1``): a batch of prompts'
        caches to their groups of samples."""
        for kind, layers in self._layers().items():
            setattr(self, kind, [None if t is None else t.repeat_interleave(n, dim=0) for t in layers])
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(n)

    def attention_mask(self, t: int, keys: int, device) -> torch.Tensor | None:
        """The boolean mask ``[B, 1, t, keys]`` (True: attend) for ``t`` queries at ``[keys − t, keys)`` over keys
        ``[0, keys)``: causal, and without a row's padding except the query's own position (a padding query must see
        one key, or its softmax is NaN; its output is never used). None when no row is padded."""
        if self.pad is None:
            return None
        memo = (t, keys, str(device))  # every layer of a step asks for the same mask
        if self._mask is not None and self._mask[0] is self.pad and self._mask[1] == memo:
            return self._mask[2]
        key = torch.arange(keys, device=device)
        query = torch.arange(keys - t, keys, device=device)
        causal = key[None, :] <= query[:, None]  # [t, keys]
        own = key[None, :] == query[:, None]
        valid = key[None, :] >= self.pad.to(device)[:, None]  # [B, keys]
        mask = (causal[None] & (valid[:, None, :] | own[None]))[:, None]
        self._mask = (self.pad, memo, mask)
        return mask


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
        padded = cache.attention_mask(t, k.shape[2], u.device) if cache is not None else None
        if padded is not None:  # left-padded rows (KVCache.pad): causal, without each row's padding
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=padded, enable_gqa=gqa)
        elif k.shape[2] == t:  # no cached prefix: plain causal attention (lets SDPA pick its flash kernel)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # query i (absolute position pos + i) sees keys 0 .. pos + i
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=u.device).tril(diagonal=k.shape[2] - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.o(y if self.sub_norm is None else self.sub_norm(y))
