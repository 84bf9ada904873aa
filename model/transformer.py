"""The BitNet b1.58 transformer with mHC-lite residual routing (PyTorch): embeddings → blocks → norm → logits.

Per token: ``X = expand(embed(t))`` (n streams), then per block two mHC sites (:mod:`model.mhc`) whose sublayers are
attention (:mod:`model.attention`) and a SwiGLU FFN, each starting with its own RMSNorm; then
``logits = lm_head(RMSNorm(mean_s X[s]))``. The LM head is the (float) token embedding when ``tie_embeddings``, else
its own float matrix. All seven matrices of a block are ternary :class:`~model.bitlinear.BitLinear`. With
``n_experts > 0`` the FFN is a mixture of ternary SwiGLU experts behind a float router (:mod:`model.moe`), and the
training loss adds ``MOE_AUX_WEIGHT`` times the blocks' mean load-balancing loss.

Optional multi-token-prediction heads (``mtp_heads = m``, for self-speculative decoding; EAGLE-like, recurrent): with
``h_t`` the final normed hidden state after token ``t`` and ``x_{t+1}`` the token after it, step 0 gives ``g_0 = h_t
+ silu(P_0 h_t + Q_0 norm_0(emb(x_{t+1})))`` and step ``k`` ``g_k = g_{k-1} + silu(P_k g_{k-1} + Q_k
norm_k(emb(x_{t+k+1})))``; ``lm_head(g_k)`` predicts the token ``t + k + 2`` (``P_k``, ``Q_k`` ternary d × d). At
decode time the tokens fed are the main model's pick and then each step's own draft (:mod:`runtime.spec_decode`).

With ``kv_lora_rank > 0`` attention is multi-head latent attention (:mod:`model.mla`) and the KV cache holds each
token's latent instead of its keys and values. With ``full_attention_interval = n > 0`` the model is a gated DeltaNet
hybrid: the token mixer of layer ``i`` is a :class:`~model.deltanet.GatedDeltaNet` unless ``(i + 1) % n == 0``, and
the cache holds a fixed-size state for those layers.

Weights move to and from GGUF through :meth:`Transformer.gguf_tensors` / :meth:`Transformer.from_gguf_tensors`,
keyed by the tensor names of :mod:`model.gguf_io` (an MoE block's experts as one stacked tensor per matrix kind).

    python -c "from model.config import get_config; from model.transformer import Transformer; \\
print(Transformer(get_config('tiny')).num_params())"
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model import mhc
from model.attention import Attention, KVCache, RMSNorm, rope_tables
from model.bitlinear import BitLinear
from model.config import ModelConfig
from model.deltanet import GatedDeltaNet
from model.mhc_static import MHCCoefficients
from model.mla import LatentAttention
from model.moe import MoEFFN
from model.ternary.quant import TernaryWeights

IGNORE_INDEX = -1  # targets equal to this do not count in the loss
EMBED_INIT_STD = 0.02
MTP_LOSS_WEIGHT = 0.3  # weight of the mean multi-token-prediction loss next to the next-token loss
MOE_AUX_WEIGHT = 0.01  # weight of the blocks' mean MoE load-balancing loss (Switch Transformer's α)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)²``: the gate activation of BitNet b1.58 (``ffn_act = "relu2"``)."""
    return torch.square(F.relu(x))


class GatedFFN(nn.Module):
    """RMSNorm → ``down(act(gate(x)) · up(x))`` with ternary gate, up and down; ``act`` is silu (SwiGLU) or relu²,
    and with ``sub_norms`` (arch ``bitnet``) the hidden is RMS-normed before ``down``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.gate = BitLinear(config.d_model, config.ffn_hidden)
        self.up = BitLinear(config.d_model, config.ffn_hidden)
        self.down = BitLinear(config.ffn_hidden, config.d_model)
        self.act = relu2 if config.ffn_act == "relu2" else F.silu
        self.sub_norm = RMSNorm(config.ffn_hidden, config.norm_eps) if config.sub_norms else None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = self.norm(u)
        h = self.act(self.gate(x)) * self.up(x)
        return self.down(h if self.sub_norm is None else self.sub_norm(h))


class Block(nn.Module):
    """One transformer block: an attention (or DeltaNet) site and an FFN site, each an mHC-lite residual update."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        if config.is_deltanet(layer):
            self.attn = GatedDeltaNet(config, layer)
        else:
            self.attn = LatentAttention(config, layer) if config.mla else Attention(config, layer)
        self.ffn = MoEFFN(config) if config.n_experts else GatedFFN(config)
        self.mhc_attn = mhc.MHCSite(config.n_streams, 2 * layer)
        self.mhc_ffn = mhc.MHCSite(config.n_streams, 2 * layer + 1)

    def forward(self, streams: torch.Tensor, rope, cache: KVCache | None, pos: int) -> torch.Tensor:
        streams = self.mhc_attn(streams, lambda u: self.attn(u, rope, cache, pos))
        return self.mhc_ffn(streams, self.ffn)


class MTPHead(nn.Module):
    """One draft step: ``g' = g + silu(P g + Q norm(e))`` from the previous step's hidden state ``g`` and the
    embedding ``e`` of the token after it (``P``, ``Q`` ternary); the next token's logits are ``lm_head(g')``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.proj = BitLinear(config.d_model, config.d_model)
        self.embed_proj = BitLinear(config.d_model, config.d_model)
        self.embed_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return g + F.silu(self.proj(g) + self.embed_proj(self.embed_norm(e)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.mhc_dynamic:
            raise NotImplementedError("dynamic mHC (mhc_dynamic=True) is not implemented; use the static variant")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.tok_emb.weight, std=EMBED_INIT_STD)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=EMBED_INIT_STD)
        self.mtp = nn.ModuleList(MTPHead(config) for _ in range(config.mtp_heads))
        cos, sin = rope_tables(config.rope_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        weight = self.tok_emb.weight
        return KVCache(self.config, batch, max_len, device=weight.device, dtype=weight.dtype)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final normed hidden state ``[B, T, d]`` of tokens ``idx [B, T]``; with a cache, they follow ``cache.pos``."""
        pos = cache.pos if cache is not None else 0
        t = idx.shape[1]
        if pos + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + t} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if cache is not None and cache.pad is not None and (self.config.mla or self.config.deltanet_layers):
            raise ValueError("left-padded batches (KVCache.pad) need a GQA model: not MLA or DeltaNet")
        rope = (self.rope_cos[pos : pos + t], self.rope_sin[pos : pos + t])
        streams = mhc.expand(self.tok_emb(idx), self.config.n_streams)
        for block in self.blocks:
            streams = block(streams, rope, cache, pos)
        if cache is not None:
            cache.pos = pos + t
        return self.norm(mhc.collapse(streams))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.tok_emb.weight if self.lm_head is None else self.lm_head.weight)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits ``[B, T, vocab]``."""
        return self.head(self.hidden(idx, cache))

    def mtp_chain(self, h: torch.Tensor, nxt: torch.Tensor) -> list[torch.Tensor]:
        """The draft steps' hidden states, teacher-forced: ``h [B, T, d]`` the final normed hidden states, ``nxt [B,
        T]`` the token after each position (the data's next tokens, or the main model's picks; negative ids count as
        0). Step ``k`` gives ``[B, T - k, d]``: at ``t`` it has seen ``h_t`` and the tokens ``t + 1 .. t + k + 1``, and
        its logits (:meth:`head`) predict the token at ``t + k + 2``."""
        e = self.tok_emb(nxt.clamp(min=0))
        out, g = [], h
        for k, step in enumerate(self.mtp):
            g = step(g if k == 0 else g[:, :-1], e[:, k:])
            out.append(g)
        return out

    def moe_aux_loss(self) -> torch.Tensor:
        """The MoE blocks' mean load-balancing loss, from the last forward (MoE configs only)."""
        return torch.stack([b.ffn.aux_loss for b in self.blocks]).mean()

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, next_token_ce)``; ``targets[:, t]`` is the token after ``idx[:, t]`` (or ``IGNORE_INDEX``). The
        total adds the weighted draft heads' loss (``mtp_heads``) and MoE load-balancing loss (``n_experts``)."""
        h = self.hidden(idx)
        ce = F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        total = ce
        if self.mtp:
            mtp = []
            for k, g in enumerate(self.mtp_chain(h, targets)):  # step k at t predicts targets[t + k + 1]
                logits = self.head(g[:, :-1])
                mtp.append(
                    F.cross_entropy(logits.flatten(0, 1), targets[:, k + 1 :].flatten(), ignore_index=IGNORE_INDEX)
                )
            total = total + MTP_LOSS_WEIGHT * torch.stack(mtp).mean()
        if self.config.n_experts:
            total = total + MOE_AUX_WEIGHT * self.moe_aux_loss()
        return total, ce.detach()

    # --- what the compiler and the GGUF file see ------------------------------------------------------------------

    def mhc_sites(self) -> list[mhc.MHCSite]:
        """The 2·n_layers mHC sites in execution order (block 0 attention, block 0 FFN, block 1 attention, ...)."""
        return [site for b in self.blocks for site in (b.mhc_attn, b.mhc_ffn)]

    def mhc_coefficients(self) -> list[MHCCoefficients]:
        """Static ``(h_pre, h_post, H_res)`` of every site as numpy float32, in execution order."""
        return [site.coefficients() for site in self.mhc_sites()]

    def _named_tensors(self) -> dict[str, BitLinear | list[BitLinear] | torch.Tensor]:
        """GGUF tensor name → the BitLinear or float parameter that holds it, or an MoE block's experts' BitLinears
        of one kind (a stacked tensor; see ``model.gguf_io``)."""
        out: dict[str, nn.Module | torch.Tensor] = {"token_embd.weight": self.tok_emb.weight,
                                                    "output_norm.weight": self.norm.weight}  # fmt: skip
        if self.lm_head is not None:
            out["output.weight"] = self.lm_head.weight
        for i, b in enumerate(self.blocks):
            p = f"blk.{i}."
            out |= {p + "attn_norm.weight": b.attn.norm.weight, p + "attn_q.weight": b.attn.q}
            if self.config.mla:  # the latent and shared rope key, their norm, the latent's up-projection to k|v
                out |= {p + "attn_kv_a_mqa.weight": b.attn.kv_a, p + "attn_kv_a_norm.weight": b.attn.kv_norm.weight,
                        p + "attn_kv_b.weight": b.attn.kv_b}  # fmt: skip
            else:
                out |= {p + "attn_k.weight": b.attn.k, p + "attn_v.weight": b.attn.v}
            out[p + "attn_output.weight"] = b.attn.o
            if isinstance(b.attn, GatedDeltaNet):  # the gate projections, A_log and the dt bias
                out |= {p + "ssm_alpha.weight": b.attn.w_alpha, p + "ssm_beta.weight": b.attn.w_beta,
                        p + "ssm_a": b.attn.A_log, p + "ssm_dt.bias": b.attn.dt_bias}  # fmt: skip
            out[p + "ffn_norm.weight"] = b.ffn.norm.weight
            if self.config.n_experts:
                out[p + "ffn_gate_inp.weight"] = b.ffn.router.weight
                for kind in ("gate", "up", "down"):
                    out[f"{p}ffn_{kind}_exps.weight"] = [getattr(x, kind) for x in b.ffn.experts]
            else:
                out |= {p + "ffn_gate.weight": b.ffn.gate, p + "ffn_up.weight": b.ffn.up,
                        p + "ffn_down.weight": b.ffn.down}  # fmt: skip
            if self.config.sub_norms:
                out |= {
                    p + "attn_sub_norm.weight": b.attn.sub_norm.weight,
                    p + "ffn_sub_norm.weight": b.ffn.sub_norm.weight,
                }
            for site_name, site in (("mhc_attn", b.mhc_attn), ("mhc_ffn", b.mhc_ffn)):
                out |= {f"{p}{site_name}.{k}": v for k, v in site.logits().items()}
        for k, m in enumerate(self.mtp):
            out |= {f"mtp.{k}.proj.weight": m.proj, f"mtp.{k}.embed_proj.weight": m.embed_proj,
                    f"mtp.{k}.embed_norm.weight": m.embed_norm.weight}  # fmt: skip
        return out

    @torch.no_grad()
    def gguf_tensors(self) -> dict[str, np.ndarray | TernaryWeights]:
        """Every tensor for export: ternary matrices as ``TernaryWeights`` (experts stacked), the rest as float32
        numpy arrays."""

        def export(t):
            if isinstance(t, list):
                return TernaryWeights.stack([bl.ternary_weights() for bl in t])
            return t.ternary_weights() if isinstance(t, BitLinear) else t.detach().float().cpu().numpy().copy()

        return {name: export(t) for name, t in self._named_tensors().items()}

    @classmethod
    @torch.no_grad()
    def from_gguf_tensors(cls, config: ModelConfig, tensors: dict[str, np.ndarray | TernaryWeights]) -> Transformer:
        """Build a model whose forward reproduces the exported one exactly (see ``BitLinear.load_ternary``)."""
        model = cls(config)
        named = model._named_tensors()
        if set(named) != set(tensors):
            missing, extra = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
            raise ValueError(f"tensor set mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, target in named.items():
            value = tensors[name]
            if isinstance(target, list):
                if not (isinstance(value, TernaryWeights) and value.stacked and len(value.scale) == len(target)):
                    got = f"{len(value.scale)} experts" if getattr(value, "stacked", False) else "no stack of experts"
                    raise ValueError(f"{name}: expected a stack of {len(target)} experts' matrices, got {got}")
                for e, expert in enumerate(target):
                    expert.load_ternary(value.expert(e))
            elif isinstance(target, BitLinear):
                target.load_ternary(value)
            else:
                value = np.asarray(value, dtype=np.float32)
                if value.shape != tuple(target.shape):
                    raise ValueError(f"{name}: shape {value.shape}, expected {tuple(target.shape)}")
                target.copy_(torch.from_numpy(value))
        return model
