"""ONNX export of the dequantized model (interop): ``input_ids [batch, seq] (int64) → logits [batch, seq, vocab]``.

Every ternary matrix is stored as its dequantized float32 weight ``W = s · codes``; activations are still quantized
per token to int8 values (``round(x · 127/amax)`` in float32, as in :mod:`model.bitlinear`), so the ONNX graph
computes the quantized model up to float32 summation order. The KV cache is not exported (full-sequence forward);
RoPE tables cover ``max_seq_len``. Uses the TorchScript exporter (``dynamo=False``), which needs no extra package.
The file is validated with ``onnx.checker``. Gated DeltaNet hybrids (:mod:`model.deltanet`) are refused.

    python -m model.onnx_export model.gguf model.onnx
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from model.bitlinear import BitLinear, quantize_activation_ste
from model.transformer import Transformer

OPSET = 17


class DequantizedLinear(nn.Module):
    """``y = (x_q / a) · Wᵀ`` with the dequantized ternary weight as a float32 constant."""

    def __init__(self, layer: BitLinear) -> None:
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(layer.ternary_weights().dequantize()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, a = quantize_activation_ste(x)
        return nn.functional.linear(xq / a.unsqueeze(-1), self.weight)


class _Logits(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def dequantized_copy(model: Transformer) -> Transformer:
    """A copy of ``model`` (eval mode) whose BitLinear layers are :class:`DequantizedLinear`."""
    return _dequantize_inplace(copy.deepcopy(model))


def _dequantize_inplace(model: Transformer) -> Transformer:
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                setattr(parent, name, DequantizedLinear(child))
    return model


def export_onnx(model: Transformer, path: str | Path, example_len: int = 8, in_place: bool = False) -> onnx.ModelProto:
    """Export, check with ``onnx.checker`` (by path: a model over 2 GB keeps its weights in external files next to
    ``path``) and return the model proto (without loading external weights). ``in_place=True`` dequantizes
    ``model`` itself instead of a deep copy (half the memory for a large model; ``model`` is then changed). A gated
    DeltaNet hybrid is refused: its chunk loop depends on the sequence length, which the traced graph would fix."""
    if model.config.full_attention_interval:
        raise ValueError(f"ONNX export does not support gated DeltaNet layers (full_attention_interval="
                         f"{model.config.full_attention_interval}): their chunked recurrence is a Python loop over the "
                         "sequence, which tracing would fix to the example's length")  # fmt: skip
    wrapped = _Logits(_dequantize_inplace(model) if in_place else dequantized_copy(model))
    example = torch.zeros(1, example_len, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(wrapped, (example,), str(path), input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                          opset_version=OPSET, dynamo=False)  # fmt: skip
    onnx.checker.check_model(str(path), full_check=True)
    return onnx.load(str(path), load_external_data=False)


def main(argv: list[str] | None = None) -> None:
    from model.gguf_io import read_gguf

    src, dst = (argv or sys.argv[1:])[:2]
    gg = read_gguf(src)
    export_onnx(Transformer.from_gguf_tensors(gg.config, gg.model_tensors()), dst)
    print(f"wrote {dst} (checked)")


if __name__ == "__main__":
    main()
