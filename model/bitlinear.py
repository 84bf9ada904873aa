"""BitLinear: a linear layer with BitNet b1.58 ternary weights and int8 per-token activations (quantization-aware).

The forward pass computes exactly the maths of :mod:`model.ternary.quant` and the compiled kernels:

* weights, per tensor: ``s = fp16(max(mean|W|, 1e-5))``, codes ``q = clip(round(W / s), -1, 1)`` (half to even);
* activations, per token: ``a = 127 / max(max|x|, 1e-5)`` (float32), ``x_q = clip(round(x·a), -127, 127)``;
* output: ``y = float32(Σ_k q·x_q) · float32(s / a)``.

The integer sum is evaluated as a float32 matmul of integer-valued tensors, which is exact while every partial sum
stays below 2^24 (``127·K < 2^24``, checked at construction), so ``y`` equals the scalar C++ reference bit for bit.
Gradients use straight-through estimators: ``∂x_q/∂x = a`` and ``∂q/∂W = 1/s`` with both scales held constant, i.e.
the usual BitNet STE ``x + (quant(x) − x).detach()``. Master weights stay float32.

    python -c "import torch; from model.bitlinear import BitLinear; print(BitLinear(256, 8)(torch.randn(2, 256)).shape)"
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from model.ternary.quant import ACT_QMAX, SCALE_EPS, TernaryWeights, quantize_weights

FLOAT32_EXACT_INT = 1 << 24  # float32 represents every integer up to 2^24 exactly


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """``fp16(max(mean|W|, 1e-5))`` as a float32 scalar tensor (the mean taken in float64, like numpy).

    No data-dependent check here (it would break ``torch.compile`` graphs and sync the GPU every layer): a scale that
    overflows float16 becomes inf, the loss turns non-finite and the training loop stops; export goes through the
    numpy quantizer, which raises a clear error.
    """
    mean = w.detach().abs().double().mean().float()
    return torch.clamp(mean, min=SCALE_EPS).half().float()


def quantize_weight_ste(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, s)``: float codes in {-1, 0, +1} whose gradient w.r.t. ``w`` is ``1/s`` (straight through)."""
    s = weight_scale(w)
    scaled = w / s
    codes = torch.clamp(torch.round(scaled), -1, 1)
    return scaled + (codes - scaled).detach(), s


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token ``a = 127 / max(max|x|, 1e-5)`` (float32, no gradient), shape ``x.shape[:-1]``."""
    amax = torch.clamp(x.detach().abs().amax(dim=-1), min=SCALE_EPS)
    return torch.full_like(amax, ACT_QMAX) / amax  # tensor / tensor: `127 / amax` would multiply by a reciprocal


def quantize_activation_ste(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q, a)``: float int8 values whose gradient w.r.t. ``x`` is ``a`` (straight through)."""
    a = activation_scale(x)
    scaled = x * a.unsqueeze(-1)
    xq = torch.clamp(torch.round(scaled), -ACT_QMAX, ACT_QMAX)
    return scaled + (xq - scaled).detach(), a


class BitLinear(nn.Module):
    """``y = x Wᵀ`` with ternary ``W`` and int8 ``x`` (no bias: BitNet has none). ``in_features`` is the K of TQ2_0."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if ACT_QMAX * in_features >= FLOAT32_EXACT_INT:
            raise ValueError(f"in_features={in_features}: 127·K must stay below 2^24 for an exact float32 sum")
        self.in_features = in_features
        self.out_features = out_features
        self.quantize = True  # False: a plain float linear layer (the dense baseline of the same shape)
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # (codes, s) while in frozen_weights()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return nn.functional.linear(x, self.weight)
        codes, s = quantize_weight_ste(self.weight) if self.frozen is None else self.frozen
        xq, a = quantize_activation_ste(x)
        acc = nn.functional.linear(xq, codes)  # integer-valued, exact in float32 (see module docstring)
        ratio = (s / a).detach()  # float32(s / a), one per token, as the reference computes it
        return acc * ratio.unsqueeze(-1)

    @torch.no_grad()
    def integer_forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The integer path in plain integer arithmetic: ``(acc int32 [..., M], y float32 [..., M])`` as numpy."""
        tw = self.ternary_weights()
        a = activation_scale(x)
        xq = torch.clamp(torch.round(x * a.unsqueeze(-1)), -ACT_QMAX, ACT_QMAX).to(torch.int64)
        acc = (xq @ torch.from_numpy(tw.codes).to(torch.int64).T).to(torch.int32)
        ratio = torch.tensor(tw.scale, dtype=torch.float32) / a
        y = acc.float() * ratio.unsqueeze(-1)
        return acc.cpu().numpy(), y.cpu().numpy()

    @torch.no_grad()
    def ternary_weights(self) -> TernaryWeights:
        """Codes and scale for export, computed by the numpy quantizer itself (``model.ternary.quantize_weights``)."""
        return quantize_weights(self.weight.detach().float().cpu().numpy())

    @torch.no_grad()
    def load_ternary(self, tw: TernaryWeights) -> None:
        """Set master weights that quantize back to exactly ``tw`` (e.g. loaded from GGUF).

        ``W = codes · s / p`` with ``p`` the fraction of non-zero codes, so ``mean|W| = s`` and ``round(W / s)``
        saturates back to the codes. Raises if the round trip is not exact.
        """
        codes = np.asarray(tw.codes)
        if codes.shape != (self.out_features, self.in_features):
            raise ValueError(f"codes of shape {codes.shape}, expected {(self.out_features, self.in_features)}")
        frac = float(np.count_nonzero(codes)) / codes.size
        mag = np.float32(tw.scale) / np.float32(frac) if frac else np.float32(0)
        self.weight.copy_(torch.from_numpy(codes.astype(np.float32) * mag))
        if frac == 0:
            return
        back = self.ternary_weights()
        if back.scale != np.float32(tw.scale) or not np.array_equal(back.codes, codes):
            raise ValueError(f"ternary weights with scale {tw.scale} do not round-trip through BitLinear")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Within the block every quantizing BitLinear of ``model`` uses codes and a scale computed once on entry, not on
    every call: sampling many tokens from fixed weights (``train.rl``) gets the same outputs without the per-call
    absmean and rounding kernels. Weights must not change inside (no optimizer step); on exit each layer quantizes per
    call again."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear) and m.quantize]
    with torch.no_grad():
        for m in layers:
            codes, s = quantize_weight_ste(m.weight)
            m.frozen = (codes.detach(), s)
    try:
        yield
    finally:
        for m in layers:
            m.frozen = None
