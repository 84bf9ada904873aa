"""8-bit optimizer state: Muon's momentum and AdamW's two moments in one byte per element, block-wise scaled.

Each state tensor is flattened and cut into blocks of :data:`BLOCK` (256) elements; a block keeps one float32 scale
(its absmax) and one ``uint8`` code per element, an index into a 256-entry (or 255-entry) table of values in [−1, 1]
(signed) or [0, 1] (unsigned): 1 + 4/256 bytes per element instead of 4, 74.6 % less. Every step dequantizes,
updates in float32 exactly as the 32-bit optimizer does, and requantizes with round-to-nearest (no stochastic
rounding, so nothing random has to be checkpointed and a resumed run is bit-identical to an uninterrupted one).

Tables (:class:`Quantizer`):

* ``linear``  — evenly spaced levels: ``k/127`` (signed, int8 absmax) or ``k/255`` (unsigned);
* ``dynamic`` — bitsandbytes' dynamic-exponent map (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"): seven decades ``[10⁻⁷, 1]``, each finer than the one below (2ⁱ levels per sign in decade ``i``,
  2ⁱ⁺¹ unsigned), so values far below the block's absmax keep a few significant bits instead of becoming 0.

What is stored (chosen by measurement: ``train.optim_compare.quant_errors``, docs/train/optim/README.md):

* Muon's momentum and AdamW's ``exp_avg``: signed ``linear`` (int8 absmax). On a real gradient stream it accumulates
  less error than ``dynamic`` in the state, in Muon's orthogonalised update and in Adam's update: the entries that
  carry the norm lie within a decade of the block's absmax, where ``linear`` has twice the levels; the ~1 % it rounds
  to 0 are the smallest ones.
* AdamW's ``exp_avg_sq``: unsigned ``dynamic`` on ``√v`` (``sqrt=True``): the update divides by ``√v``, so that is
  the quantity whose relative error matters, and the square root halves the decades a block has to span. A linear
  table on ``v`` rounds small entries to 0, and their update ``m / (√0 + ε)`` explodes (error ×100 and more).

Tensors with fewer than ``min_8bit_size`` (4096) elements (norm gains, mHC logits) keep float32 state, as in
bitsandbytes: they cost nothing and are the most sensitive. State entries are plain tensors in ``Optimizer.state``
(``momentum_q`` / ``momentum_scale``, ``exp_avg_q`` / ``exp_avg_scale``, ``exp_avg_sq_q`` / ``exp_avg_sq_scale``,
``step``), so ``train.checkpoint`` saves and restores them; ``Optimizer.load_state_dict`` casts every non-step state
tensor to the parameter's float dtype, so a load hook casts the codes back to ``uint8`` (exact: they are integers).

    python -m train.train --preset tiny --data data/shards --out runs/tiny8 --optimizer muon8 --adamw-bits 8
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch.nn import functional as F

from train.muon import BatchedMuon

BLOCK = 256
MIN_8BIT_SIZE = 4096


@cache
def code_table(kind: str, signed: bool) -> torch.Tensor:
    """The sorted float32 values a code indexes: ``linear`` or ``dynamic`` (see the module docstring)."""
    if kind == "linear":
        return torch.arange(-127, 128) / 127.0 if signed else torch.arange(256) / 255.0
    if kind != "dynamic":
        raise ValueError(f"unknown quantization table {kind!r}; known: linear, dynamic")
    values = [0.0, 1.0]
    for i in range(7):  # decade i spans [10^(i-7), 10^(i-6)]
        n = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + ([-m for m in means] if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True)
class Quantizer:
    """Block-wise 8-bit codes for a batch of flattened tensors: ``quantize(x [batch, n])`` → ``(codes [batch, n]
    uint8, scales [batch, ceil(n / block)] float32)``; ``dequantize`` inverts it up to the table's rounding."""

    kind: str = "dynamic"  # "linear" | "dynamic"
    signed: bool = True
    sqrt: bool = False  # store √x (x ≥ 0): relative error of √x, half the decades of x
    block: int = BLOCK

    @property
    def table(self) -> torch.Tensor:
        return code_table(self.kind, self.signed)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n = x.shape
        x = x.float()
        if self.sqrt:
            x = x.clamp(min=0).sqrt()
        blocks = F.pad(x, (0, -n % self.block)).view(batch, -1, self.block)
        scale = blocks.abs().amax(-1)
        normed = blocks / scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
        table = self.table.to(x.device)
        codes = torch.bucketize(normed, (table[1:] + table[:-1]) / 2)  # nearest level (ties go down)
        return codes.to(torch.uint8).view(batch, -1)[:, :n].contiguous(), scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        batch, n = codes.shape
        padded = F.pad(codes, (0, -n % self.block)).view(batch, -1, self.block)
        x = (self.table.to(codes.device)[padded.long()] * scale.unsqueeze(-1)).view(batch, -1)[:, :n]
        return x.square() if self.sqrt else x


SIGNED = Quantizer("linear", signed=True)  # Muon momentum, Adam exp_avg
SECOND_MOMENT = Quantizer("dynamic", signed=False, sqrt=True)  # Adam exp_avg_sq


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors (codes, scales, moments, step counters, projectors)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def _codes_back_to_uint8(opt: torch.optim.Optimizer) -> None:
    """Load hook: ``Optimizer.load_state_dict`` cast the codes to the parameter's dtype; the values are integers."""
    for st in opt.state.values():
        for name, v in st.items():
            if name.endswith("_q") and v.dtype != torch.uint8:
                st[name] = v.to(torch.uint8)


class Muon8bit(BatchedMuon):
    """:class:`train.muon.BatchedMuon` with the momentum in 8 bits (``momentum_q`` codes, ``momentum_scale``)."""

    def __init__(self, params, quantizer: Quantizer = SIGNED, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.quantizer = quantizer
        self.register_load_state_dict_post_hook(_codes_back_to_uint8)

    def _load_momentum(self, params: list[torch.Tensor]) -> torch.Tensor:
        for p in params:
            if "momentum_q" not in self.state[p]:
                q, s = self.quantizer.quantize(torch.zeros(1, p.numel(), device=p.device))
                self.state[p].update(momentum_q=q[0], momentum_scale=s[0])
        codes = torch.stack([self.state[p]["momentum_q"] for p in params])
        scales = torch.stack([self.state[p]["momentum_scale"] for p in params])
        return self.quantizer.dequantize(codes, scales).view(len(params), *params[0].shape)

    def _store_momentum(self, params: list[torch.Tensor], buf: torch.Tensor) -> None:
        codes, scales = self.quantizer.quantize(buf.flatten(1))
        for i, p in enumerate(params):
            self.state[p]["momentum_q"].copy_(codes[i])
            self.state[p]["momentum_scale"].copy_(scales[i])


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with ``exp_avg`` and ``exp_avg_sq`` in 8 bits.

    The arithmetic is ``torch.optim.AdamW``'s single-tensor path; with every tensor below ``min_8bit_size`` it is
    that optimizer bit for bit (tested)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, signed: Quantizer = SIGNED,
                 second: Quantizer = SECOND_MOMENT) -> None:  # fmt: skip
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.min_8bit_size, self.signed, self.second = min_8bit_size, signed, second
        self.register_load_state_dict_post_hook(_codes_back_to_uint8)

    def _init_state(self, p: torch.Tensor) -> None:
        st = self.state[p]
        st["step"] = torch.tensor(0.0)
        if p.numel() < self.min_8bit_size:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            return
        zeros = torch.zeros(1, p.numel(), device=p.device)
        for name, quantizer in (("exp_avg", self.signed), ("exp_avg_sq", self.second)):
            q, s = quantizer.quantize(zeros)
            st[name + "_q"], st[name + "_scale"] = q[0], s[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    self._init_state(p)
                quantized = "exp_avg_q" in st
                if quantized:
                    m = self.signed.dequantize(st["exp_avg_q"][None], st["exp_avg_scale"][None]).view_as(p)
                    v = self.second.dequantize(st["exp_avg_sq_q"][None], st["exp_avg_sq_scale"][None]).view_as(p)
                else:
                    m, v = st["exp_avg"], st["exp_avg_sq"]
                st["step"] += 1
                step = float(st["step"])
                grad = p.grad
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**step))
                if quantized:
                    for name, quantizer, x in (("exp_avg", self.signed, m), ("exp_avg_sq", self.second, v)):
                        q, s = quantizer.quantize(x.view(1, -1))
                        st[name + "_q"].copy_(q[0])
                        st[name + "_scale"].copy_(s[0])
        return loss
