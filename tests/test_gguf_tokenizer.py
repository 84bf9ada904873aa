"""The tokenizer fields of the GGUF file rebuild a tokenizer that encodes and decodes exactly like the trained one:
the GPT-2 byte-level BPE that ``train/`` trains, and the Llama 3 one (``llama-bpe``) of imported checkpoints.

pytest tests/test_gguf_tokenizer.py -q
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import SPECIALS, tiny_hf_tokenizer, tiny_spec
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model.gguf_io import read_gguf, write_gguf
from model.tokenizer import (
    LLAMA3_PATTERN,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    TokenizerError,
    hf_from_spec,
    spec_from_hf,
)

SAMPLES = [
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # ok",
    "naïve café ✓ 漢字 🙂",
    "<|user|>hi<|end|>",
    "",
    "\x00\t\r\n",
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
LLAMA3_SAMPLES = [
    *SAMPLES,
    "12345 1234567 3.14159 0x1F",
    "they're we've I'm you'll she'd IT'S THEY'RE",
    "line one\r\nline two\n\n\n   indented\t\ttabs  \n",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and math ∑∫≤",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "   leading and trailing spaces   ",
    "class A:\n    def __init__(self):\n        self.x = [i**2 for i in range(10)]\n",
    "<|tool|>call(x)<|tool|>",
]


def llama3_pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])  # fmt: skip


@functools.cache
def llama3_hf_tokenizer(vocab_size: int = 700) -> Tokenizer:
    """A Llama 3 style byte-level BPE (nothing downloaded): its pre-tokenizer, ``ignore_merges``, the ByteLevel
    decoder, a BOS post-processor, special tokens after the BPE vocabulary (as Llama 3's 128000+) and one
    non-special added token; trained on two stdlib modules and the samples."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = llama3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    texts = [inspect.getsource(json.decoder), inspect.getsource(functools), "\n".join(LLAMA3_SAMPLES) * 3]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    tok.add_tokens([AddedToken("<|tool|>", special=False, normalized=False)])
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])  # fmt: skip
    return tok


def llama3_spec():
    return spec_from_hf(llama3_hf_tokenizer(), bos=LLAMA3_SPECIALS[0], eos=LLAMA3_SPECIALS[-1])


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


# --- Llama 3 (llama-bpe) -------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_llama3_spec_records_pre_specials_and_ids():
    tok, spec = llama3_hf_tokenizer(), llama3_spec()
    assert spec.pre == "llama-bpe" and spec.ignore_merges and len(spec.tokens) == tok.get_vocab_size()
    control = [spec.tokens[i] for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL]
    assert control == LLAMA3_SPECIALS  # after the BPE vocabulary, in order
    assert spec.token_type[spec.tokens.index("<|tool|>")] == TOKEN_USER_DEFINED
    assert spec.token_type[spec.tokens.index("Ġ")] == TOKEN_NORMAL
    assert (spec.bos_id, spec.eos_id) == (tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>"))


@pytest.mark.unit
@settings(deadline=None, max_examples=60)
@given(text=st.one_of(st.sampled_from(LLAMA3_SAMPLES), st.text(max_size=200),
                      st.text(alphabet="0123456789 \n\r\t'sreEvmld-_", max_size=60)))  # fmt: skip
def test_llama3_rebuilt_tokenizer_matches_the_original(text):
    original, rebuilt = llama3_hf_tokenizer(), hf_from_spec(llama3_spec())
    ids = original.encode(text, add_special_tokens=False).ids  # the rebuilt one has no BOS post-processor
    assert rebuilt.encode(text).ids == ids
    assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False) == text


@pytest.mark.unit
def test_llama3_pre_tokenizer_splits_digits_and_contractions_as_llama3_does():
    rebuilt = hf_from_spec(llama3_spec())
    pieces = [p for p, _ in rebuilt.pre_tokenizer.pre_tokenize_str("x 1234567 THEY'RE\n\n  y")]
    assert pieces == ["x", "Ġ", "123", "456", "7", "ĠTHEY", "'RE", "ĊĊ", "Ġ", "Ġy"]


@pytest.mark.unit
def test_ignore_merges_is_kept():
    """The token "abc" exists, but merging alone ends at ["a", "bc"] ("b c" outranks "a b"): Llama 3 takes it whole."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for t in ("bc", "ab", "abc"):
        vocab[t] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer, tok.decoder = llama3_pre_tokenizer(), decoders.ByteLevel()
    spec = spec_from_hf(tok)
    assert spec.pre == "llama-bpe" and spec.ignore_merges
    assert hf_from_spec(spec).encode("abc").tokens == tok.encode("abc").tokens == ["abc"]
    gpt2 = dataclasses.replace(spec, pre="gpt-2")  # merges only: the flag matters for this vocabulary
    assert hf_from_spec(gpt2).encode("abc").tokens == ["a", "bc"]


def _with(tok: Tokenizer, **changes) -> Tokenizer:
    data = json.loads(tok.to_str())
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return Tokenizer.from_str(json.dumps(data))


@pytest.mark.unit
@pytest.mark.parametrize(
    "changes, found",
    [
        ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}},
         "Metaspace"),
        ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}},
         "ByteLevel(add_prefix_space=true"),
        ({"pre_tokenizer": {"type": "Whitespace"}}, "got Whitespace()"),
        ({"pre_tokenizer__pretokenizers__0__pattern": {"Regex": "\\p{N}{1,3}|\\s+"}}, 'Split(pattern={"Regex": "'),
        ({"pre_tokenizer__pretokenizers__0__behavior": "Removed"}, 'behavior="Removed"'),
        ({"pre_tokenizer__pretokenizers__1__use_regex": True}, "use_regex=true)]"),
        ({"pre_tokenizer": None}, "got none"),
    ],
)  # fmt: skip
def test_unsupported_pre_tokenizers_are_refused_naming_what_was_found(changes, found):
    with pytest.raises(TokenizerError, match="pre-tokenizer") as err:
        spec_from_hf(_with(llama3_hf_tokenizer(), **changes))
    assert found in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    "tok, changes, match",
    [
        ("llama3", {"model__ignore_merges": False}, "ignore_merges = False"),
        ("gpt2", {"model__ignore_merges": True}, "ignore_merges = True"),
        ("llama3", {"normalizer": {"type": "NFC"}}, "normalizer"),
        ("llama3", {"decoder": {"type": "Fuse"}}, "decoder"),
        ("llama3", {"model__byte_fallback": True}, "byte_fallback"),
        ("llama3", {"added_tokens__0__rstrip": True}, "rstrip"),
    ],
)
def test_pipelines_the_gguf_cannot_carry_are_refused(tok, changes, match):
    base = llama3_hf_tokenizer() if tok == "llama3" else tiny_hf_tokenizer()
    with pytest.raises(TokenizerError, match=match):
        spec_from_hf(_with(base, **changes))


@pytest.mark.unit
def test_unknown_pre_and_roles_are_refused():
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.pre = 'qwen2'"):
        dataclasses.replace(llama3_spec(), pre="qwen2").validate()
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.pre"):
        hf_from_spec(dataclasses.replace(llama3_spec(), pre="qwen2"))
    assert hf_from_spec(dataclasses.replace(tiny_spec(), pre="default")).encode(SAMPLES[0]).ids == (
        tiny_hf_tokenizer().encode(SAMPLES[0]).ids
    )  # what the reader assumes when tokenizer.ggml.pre is absent
    with pytest.raises(TokenizerError, match=r"eos token '<\|nope\|>' is not in the vocabulary"):
        spec_from_hf(llama3_hf_tokenizer(), eos="<|nope|>")


@pytest.mark.unit
def test_llama3_tokenizer_survives_the_gguf_file(tmp_path):
    from model.config import get_config
    from model.transformer import Transformer

    cfg = get_config("tiny", vocab_size=768)
    write_gguf(tmp_path / "t.gguf", cfg, Transformer(cfg).gguf_tensors(), llama3_spec().padded(768))
    spec = read_gguf(tmp_path / "t.gguf").tokenizer
    assert spec.pre == "llama-bpe" and spec.bos_id == llama3_spec().bos_id
    rebuilt = hf_from_spec(spec)
    for text in LLAMA3_SAMPLES:
        assert rebuilt.encode(text).ids == llama3_hf_tokenizer().encode(text, add_special_tokens=False).ids
