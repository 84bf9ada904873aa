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
