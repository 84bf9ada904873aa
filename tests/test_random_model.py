"""model/random_model.py: random-weight GGUFs for benchmarks are valid files the whole stack accepts."""

import numpy as np
import pytest

from model.gguf_io import read_gguf
from model.random_model import byte_tokens, write_random_gguf
from model.tokenizer import hf_from_spec

pytestmark = pytest.mark.unit


def test_byte_tokens_are_gpt2s_256_distinct_printable_characters():
    toks = byte_tokens()
    assert len(set(toks)) == 256 and toks[ord("A")] == "A" and toks[ord(" ")] == "Ġ" and toks[ord("\n")] == "Ċ"


@pytest.mark.parametrize("n_streams", [1, 2, 4])
def test_random_gguf_reads_back_and_runs(tmp_path, n_streams):
    import torch

    from model.config import get_config
    from model.transformer import Transformer

    g = read_gguf(write_random_gguf(get_config("tiny", n_streams=n_streams), tmp_path / "r.gguf"))
    assert g.config.n_streams == n_streams and len(g.tokenizer.tokens) == g.config.vocab_size
    tok = hf_from_spec(g.tokenizer)
    assert tok.decode(tok.encode("def f():  return 1").ids) == "def f():  return 1"  # byte-level: lossless
    codes = g.tensors["blk.0.ffn_up.weight"].ternary().codes
    assert set(np.unique(codes)) == {-1, 0, 1}
    model = Transformer.from_gguf_tensors(g.config, g.model_tensors())
    logits = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all() and logits.std() > 0  # random weights still give a working forward
