"""Shared helpers for the model tests: a tiny byte-level BPE trained in memory (nothing downloaded), a tiny model."""

from __future__ import annotations

import functools
import inspect
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.tokenizer import TokenizerSpec, spec_from_hf

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"


@functools.cache
def tiny_hf_tokenizer() -> Tokenizer:
    """Byte-level BPE (≤ 500 tokens) trained on the source of two stdlib modules, the way ``train/`` trains."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([inspect.getsource(json.decoder), inspect.getsource(functools)], trainer=trainer)
    return tok


def tiny_spec(vocab_size: int = 512) -> TokenizerSpec:
    return spec_from_hf(tiny_hf_tokenizer(), chat_template=CHAT_TEMPLATE, eos=SPECIALS[0]).padded(vocab_size)


def assert_gguf_round_trip(model, path, ternary_type, tokens: int = 12) -> dict:
    """Write ``model`` to a GGUF at ``path`` and read it back: the same config, every tensor identical (codes and
    scales for ternaries), and a model rebuilt from the file gives identical logits on ``tokens`` random tokens.
    Returns the tensors read back."""
    import numpy as np
    import torch

    from model.gguf_io import GGMLType, read_gguf, write_gguf
    from model.ternary.quant import TernaryWeights
    from model.transformer import Transformer

    cfg, tensors = model.config, model.gguf_tensors()
    write_gguf(path, cfg, tensors, tiny_spec(cfg.vocab_size), ternary_type, GGMLType.F32)
    g = read_gguf(path)
    assert g.config == cfg
    back = g.model_tensors()
    for name, want in tensors.items():
        got = back[name]
        if isinstance(want, TernaryWeights):
            assert np.array_equal(got.scale, want.scale) and np.array_equal(got.codes, want.codes), name
        else:
            assert np.array_equal(got, want), name
    again = Transformer.from_gguf_tensors(g.config, back).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))
    return back
