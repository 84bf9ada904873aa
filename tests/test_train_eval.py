"""Evaluation, export and the end-to-end CPU recipe (train/eval.py, train/export.py, train/recipe.py)."""

import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import tiny_hf_tokenizer

from model.config import get_config
from model.gguf_io import read_gguf
from model.transformer import Transformer
from train.corpus import SourceFile
from train.eval import (
    EvalConfig,
    EvalDataError,
    cut_body,
    function_prompts,
    is_valid_function,
    loss_and_bpb,
    token_byte_lengths,
    trim_to_statement,
)

PROMPT = 'def area(r):\n    """Area of a circle of radius r."""'


@pytest.mark.unit
def test_body_ends_at_column_zero_and_partial_lines_are_dropped():
    completion = "\n    x = r * r\n    return 3.14 * x\n\nclass Next:\n    pass"
    body = cut_body(completion, hit_limit=False)
    assert body == "\n    x = r * r\n    return 3.14 * x\n" and is_valid_function(PROMPT, body)
    assert cut_body("\n    return (r *", hit_limit=True) == "\n"  # the cut line is gone, nothing else remains
    assert not is_valid_function(PROMPT, "\n")  # a docstring alone is not a body
    assert not is_valid_function(PROMPT, "\n    return (r *\n")  # unbalanced
    assert not is_valid_function(PROMPT, "\n    return r\nx = 1\n")  # more than the one function


@pytest.mark.unit
def test_trimming_keeps_complete_statements_only():
    body = "\n    if r:\n        return 1\n    if r:"
    assert not is_valid_function(PROMPT, body)
    trimmed = trim_to_statement(PROMPT, body)
    assert trimmed == "\n    if r:\n        return 1" and is_valid_function(PROMPT, trimmed)
    assert trim_to_statement(PROMPT, "\n    (((") == "\n    ((("  # nothing parses: unchanged


@pytest.mark.unit
def test_function_prompts_are_docstring_functions_with_bodies(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        'def a(x):\n    """Doc a."""\n    return x\n\n'
        "def b(x):\n    return x\n\n"  # no docstring
        'def c():\n    """Only a docstring."""\n\n'  # no body
        'class K:\n    @staticmethod\n    def d(y):\n        """Doc d."""\n        return y\n'
    )
    (tmp_path / "bad.py").write_text("def (:\n")
    files = [SourceFile(str(p), "t", "m", p.stat().st_size, "", "val") for p in (src, tmp_path / "bad.py")]
    prompts = function_prompts(files, 10, seed=0)
    assert sorted(p["name"] for p in prompts) == ["a", "d"]
    d = next(p for p in prompts if p["name"] == "d")
    assert d["prompt"] == '@staticmethod\ndef d(y):\n    """Doc d."""'  # dedented, decorator kept, ends at the quotes


@pytest.mark.unit
def test_bits_per_byte_counts_every_byte_once():
    tok = tiny_hf_tokenizer()
    text = "def f(x):\n    return x + 1\n" * 40
    tokens = np.array(tok.encode(text).ids, dtype=np.uint16)
    lengths = token_byte_lengths(tok)
    assert int(lengths[tokens].sum()) == len(text.encode())  # byte-level BPE: one char of a token is one byte
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=tok.get_vocab_size()))
    out = loss_and_bpb(model, tokens, lengths, EvalConfig(seq_len=32, batch_size=4))
    assert out["val_tokens"] == (tokens.size - 1) // 32 * 32
    assert out["bits_per_byte"] == pytest.approx(out["val_loss"] * out["val_tokens"] / math.log(2) / out["val_bytes"])


@pytest.mark.e2e
@pytest.mark.slow
def test_cpu_recipe_runs_end_to_end_and_exports_an_exact_gguf(tmp_path):
    from train.recipe import run

    args = Namespace(preset="tiny", out=str(tmp_path), roots=None, tokenizer_mb=2.0, steps=12, batch_size=4,
                     seq_len=64, compile=False, variant="ternary", eval_tokens=2048, eval_functions=3,
                     device="cpu")  # fmt: skip
    summary = run(args)
    assert summary["train_ternary"]["step"] == 12
    assert summary["export"]["max_logit_gap"] == 0.0  # the reloaded GGUF reproduces the checkpoint exactly
    gg = read_gguf(Path(tmp_path) / "model.gguf")
    assert gg.config.name == "tiny" and gg.tokenizer.chat_template and "<|assistant|>" in gg.tokenizer.chat_template
    report = json.loads((Path(tmp_path) / "eval_ternary.json").read_text())
    assert 0 < report["bits_per_byte"] < 10 and report["code"]["functions"] == 3
    assert {"validity_rate", "validity_rate_trimmed", "hit_token_limit"} <= set(report["code"])
    assert not {"corpus", "tokenizer", "shards"} & set(run(args)["timings_s"])  # a rerun skips finished stages


@pytest.mark.unit
def test_an_empty_or_all_special_val_split_is_a_clear_error():
    tok = tiny_hf_tokenizer()
    model = Transformer(get_config("tiny", vocab_size=tok.get_vocab_size()))
    lengths, cfg = token_byte_lengths(tok), EvalConfig(seq_len=32, batch_size=4)
    with pytest.raises(EvalDataError, match="shorter than one window"):
        loss_and_bpb(model, np.zeros(0, np.uint16), lengths, cfg)
    eot = tok.token_to_id("<|endoftext|>")
    with pytest.raises(EvalDataError, match="all special tokens"):
        loss_and_bpb(model, np.full(100, eot, np.uint16), lengths, cfg)
