"""The tokenizer fields of the GGUF file rebuild a tokenizer that encodes and decodes exactly like the trained one.

pytest tests/test_gguf_tokenizer.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import SPECIALS, tiny_hf_tokenizer, tiny_spec

from model.gguf_io import read_gguf, write_gguf
from model.tokenizer import TOKEN_CONTROL, TOKEN_UNUSED, TokenizerError, hf_from_spec

SAMPLES = [
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # ok",
    "naïve café ✓ 漢字 🙂",
    "<|user|>hi<|end|>",
    "",
    "\x00\t\r\n",
]


@pytest.mark.unit
def test_spec_records_specials_and_padding():
    spec = tiny_spec(512)
    assert len(spec.tokens) == 512 and spec.model == "gpt2"
    assert [spec.tokens[i] for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL] == SPECIALS
    assert spec.token_type[-1] == TOKEN_UNUSED and spec.eos_id == spec.tokens.index("<|endoftext|>")
    assert spec.chat_template and all(len(m.split(" ")) == 2 for m in spec.merges)


@pytest.mark.unit
@settings(deadline=None, max_examples=50)
@given(text=st.one_of(st.sampled_from(SAMPLES), st.text(max_size=200)))
def test_rebuilt_tokenizer_matches_the_trained_one(text):
    original, rebuilt = tiny_hf_tokenizer(), hf_from_spec(tiny_spec())
    ids = original.encode(text).ids
    assert rebuilt.encode(text).ids == ids
    assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)


@pytest.mark.unit
def test_tokenizer_survives_the_gguf_file(tmp_path):
    from model.config import get_config
    from model.transformer import Transformer

    cfg = get_config("tiny")
    write_gguf(tmp_path / "t.gguf", cfg, Transformer(cfg).gguf_tensors(), tiny_spec())
    rebuilt = hf_from_spec(read_gguf(tmp_path / "t.gguf").tokenizer)
    for text in SAMPLES:
        assert rebuilt.encode(text).ids == tiny_hf_tokenizer().encode(text).ids


@pytest.mark.unit
def test_invalid_specs_are_rejected():
    spec = tiny_spec()
    for bad in (dataclasses.replace(spec, model="llama"), dataclasses.replace(spec, token_type=spec.token_type[:-1]),
                dataclasses.replace(spec, eos_id=10_000), dataclasses.replace(spec, merges=("a b c",)),
                dataclasses.replace(spec, tokens=spec.tokens[:-1] + spec.tokens[:1])):  # fmt: skip
        with pytest.raises(TokenizerError):
            bad.validate()
    with pytest.raises(TokenizerError, match="merges"):
        hf_from_spec(dataclasses.replace(spec, merges=("zzz_not_a_token Ġ",)))


@pytest.mark.e2e
def test_reader_modules_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, model, model.gguf_io, model.tokenizer, model.mhc_static; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
