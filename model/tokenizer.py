"""The tokenizer as the GGUF file stores it (``tokenizer.ggml.*``), and conversion to and from HF ``tokenizers``.

Byte-level BPE in the GPT-2 convention (``tokenizer.ggml.model = "gpt2"``): tokens are the byte-level-encoded
strings (``"Ġdef"``), merges are ``"left right"`` strings in priority order, token types follow llama.cpp
(1 normal, 3 control = special added token, 4 user-defined = other added token, 5 unused). ``tokenizer.ggml.pre``
names the pre-tokenizer as llama.cpp does (llama.cpp refuses names it does not know), one of :data:`PRE_TOKENIZERS`:

* ``"gpt-2"`` (and ``"default"``, what the reader assumes when the key is absent): ``ByteLevel(add_prefix_space=False)``
  with its GPT-2 regex; merges always apply. What ``train/`` trains.
* ``"llama-bpe"`` (Llama 3, BitNet b1.58 2B-4T): ``Split`` on :data:`LLAMA3_PATTERN` (``Isolated``), then
  ``ByteLevel(add_prefix_space=False, use_regex=False)``; ``ignore_merges``: a pre-token that is itself in the
  vocabulary is taken whole before any merge (llama.cpp sets the same flag for this name).

Both use the ``ByteLevel`` decoder, no normalizer and no post-processor (a BOS token comes from the chat template or
the caller); special tokens are added tokens. :func:`spec_from_hf` refuses any other pipeline with a
:class:`TokenizerError` saying what it found, and :func:`hf_from_spec` rebuilds one that encodes and decodes exactly
like the original. No torch here: the runtime imports this module.

    python -m model.tokenizer data/tokenizer.json     # prints the spec summary of a tokenizer.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
TOKEN_TYPES = (1, 2, 3, 4, 5, 6)  # llama.cpp: normal, unknown, control, user-defined, unused, byte
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 pre-tokenizer regex
PRE_LLAMA3 = "llama-bpe"  # llama.cpp's name for the Llama 3 pre-tokenizer
# The Llama 3 pre-tokenizer regex, character for character as its tokenizer.json holds it.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre → does the BPE take a pre-token found whole in the vocabulary before merging (ignore_merges)?
PRE_TOKENIZERS = {PRE_TOKENIZER: False, "default": False, PRE_LLAMA3: True}


class TokenizerError(ValueError):
    """A tokenizer that cannot be stored in, or rebuilt from, the GGUF fields."""


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything under ``tokenizer.ggml.*`` (and ``tokenizer.chat_template``); ids are ``None`` when absent."""

    tokens: tuple[str, ...]
    merges: tuple[str, ...]
    token_type: tuple[int, ...]
    model: str = "gpt2"
    pre: str = PRE_TOKENIZER
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    chat_template: str | None = None
    extra: dict = field(default_factory=dict, compare=False)  # unrecognised tokenizer.* keys, kept for inspection

    def validate(self) -> None:
        n = len(self.tokens)
        if self.model != "gpt2":
            raise TokenizerError(f"tokenizer.ggml.model = {self.model!r}; only 'gpt2' (byte-level BPE) is supported")
        if self.pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"tokenizer.ggml.pre = {self.pre[:40]!r}; supported: {', '.join(PRE_TOKENIZERS)}")
        if n == 0:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        if len(self.token_type) != n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(self.token_type)} entries for {n} tokens")
        if len(set(self.tokens)) != n:
            raise TokenizerError("tokenizer.ggml.tokens holds duplicate tokens")
        bad = sorted(set(self.token_type) - set(TOKEN_TYPES))
        if bad:
            raise TokenizerError(f"tokenizer.ggml.token_type holds unknown types {bad[:5]}")
        for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < n:
                raise TokenizerError(f"tokenizer {name} = {v} is outside the vocabulary [0, {n})")
        vocab = set(self.tokens)
        for i, m in enumerate(self.merges):
            pair = m.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"tokenizer.ggml.merges[{i}]: {m[:40]!r} is not 'left right'")
            unknown = [t for t in (*pair, "".join(pair)) if t not in vocab]
            if unknown:
                raise TokenizerError(f"tokenizer.ggml.merges[{i}] = {m[:40]!r} names {unknown[0][:40]!r}, which is not "
                                     "a token of the vocabulary")  # fmt: skip

    @property
    def ignore_merges(self) -> bool:
        """Whether a pre-token found whole in the vocabulary skips the merges (``pre`` implies it, as in llama.cpp)."""
        return PRE_TOKENIZERS.get(self.pre, False)

    def padded(self, vocab_size: int) -> TokenizerSpec:
        """Fill the vocabulary up to ``vocab_size`` with unused ``<|unused_i|>`` tokens (a model may be larger)."""
        missing = vocab_size - len(self.tokens)
        if missing < 0:
            raise TokenizerError(f"tokenizer has {len(self.tokens)} tokens, more than vocab_size {vocab_size}")
        fill = tuple(f"<|unused_{i}|>" for i in range(missing))
        return replace(self, tokens=self.tokens + fill, token_type=self.token_type + (TOKEN_UNUSED,) * missing)


def spec_from_hf(
    tok, chat_template: str | None = None, bos: str | None = None, eos: str | None = None, pad: str | None = None
) -> TokenizerSpec:
    """A byte-level BPE HF ``tokenizers.Tokenizer`` → :class:`TokenizerSpec` (``bos``/``eos``/``pad`` by content).

    Added tokens become control tokens when ``special``, user-defined ones otherwise. Raises :class:`TokenizerError`
    for a pipeline :func:`hf_from_spec` cannot rebuild exactly (see the module docstring)."""
    data = json.loads(tok.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"expected a BPE model, got {model.get('type')!r}")
    pre = _pre_name(data.get("pre_tokenizer"))
    _check_pipeline(data, model)
    if bool(model.get("ignore_merges")) != PRE_TOKENIZERS[pre]:
        raise TokenizerError(f"model.ignore_merges = {bool(model.get('ignore_merges'))} with the {pre!r} "
                             f"pre-tokenizer: the GGUF (like llama.cpp) implies ignore_merges = {PRE_TOKENIZERS[pre]} "
                             "for it")  # fmt: skip
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
        if vocab[added["content"]] != added["id"]:
            raise TokenizerError(f"added token {added['content'][:40]!r} has id {added['id']} but the vocabulary "
                                 f"gives it {vocab[added['content']]}")  # fmt: skip
        flags = [k for k in ("lstrip", "rstrip", "single_word") if added.get(k)]
        if flags:
            raise TokenizerError(f"added token {added['content'][:40]!r} sets {', '.join(flags)}, which the GGUF "
                                 "tokenizer cannot express")  # fmt: skip
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise TokenizerError("token ids are not contiguous from 0")
    tokens = [""] * len(ids)
    for text, i in vocab.items():
        tokens[i] = text
    added = {a["id"]: TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED for a in data.get("added_tokens", [])}
    types = tuple(added.get(i, TOKEN_NORMAL) for i in range(len(tokens)))
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []))

    def token_id(role: str, content: str | None) -> int | None:
        if content is None:
            return None
        if content not in vocab:
            raise TokenizerError(f"{role} token {content[:40]!r} is not in the vocabulary")
        return vocab[content]

    roles = {f"{role}_id": token_id(role, content) for role, content in (("bos", bos), ("eos", eos), ("pad", pad))}
    spec = TokenizerSpec(tuple(tokens), merges, types, pre=pre, chat_template=chat_template, **roles)
    spec.validate()
    return spec


def _pre_name(pre: dict | None) -> str:
    """The llama.cpp name of an HF pre-tokenizer (its JSON form), or :class:`TokenizerError` saying what it is."""
    pre = pre or {}
    if pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True):
        return PRE_TOKENIZER
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2:
        split, byte_level = steps
        if (split.get("type") == "Split" and split.get("pattern") == {"Regex": LLAMA3_PATTERN}
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
                and not byte_level.get("use_regex", True)):  # fmt: skip
            return PRE_LLAMA3
    raise TokenizerError("expected a ByteLevel(add_prefix_space=False) pre-tokenizer (GPT-2) or Sequence[Split(<the "
                         "Llama 3 regex>, Isolated), ByteLevel(add_prefix_space=False, use_regex=False)] (Llama 3), "
                         f"got {_describe(pre)[:400]}")  # fmt: skip


def _describe(node: dict) -> str:
    """A pre-tokenizer's JSON form as ``Type(key=value, ...)``, a Llama 3 pattern named rather than spelled out."""
    if not node:
        return "none"
    if node.get("type") == "Sequence":
        return f"Sequence[{', '.join(_describe(s) for s in node.get('pretokenizers') or [])}]"
    args = []
    for key, value in node.items():
        if key != "type":
            text = "<the Llama 3 regex>" if value == {"Regex": LLAMA3_PATTERN} else json.dumps(value)
            args.append(f"{key}={text[:80]}")
    return f"{node.get('type')}({', '.join(args)})"


def _check_pipeline(data: dict, model: dict) -> None:
    """Refuse the parts of an HF pipeline that the GGUF fields cannot carry (they would change ids or text)."""
    if data.get("normalizer"):
        raise TokenizerError(f"normalizer {json.dumps(data['normalizer'])[:200]}: only no normalizer is supported")
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise TokenizerError(f"decoder {json.dumps(decoder)[:200]}: expected a ByteLevel decoder")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise TokenizerError(f"model.{key} = {model[key]!r}: not supported by a byte-level BPE GGUF tokenizer")


def hf_from_spec(spec: TokenizerSpec):
    """:class:`TokenizerSpec` → an HF ``tokenizers.Tokenizer`` that encodes and decodes like the original one."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    spec.validate()
    vocab = {t: i for i, t in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ")) for m in spec.merges]  # validate() checked that they name known tokens
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges))
    if spec.pre == PRE_LLAMA3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    else:  # "gpt-2", "default" (validate() refused anything else)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(spec.tokens[i], special=True, normalized=False)
                            for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL])  # fmt: skip
    tok.add_tokens([AddedToken(spec.tokens[i], special=False, normalized=False)
                    for i, t in enumerate(spec.token_type) if t == TOKEN_USER_DEFINED])  # fmt: skip
    return tok


def main(argv: list[str] | None = None) -> None:
    from tokenizers import Tokenizer

    path = (argv or sys.argv[1:])[0]
    spec = spec_from_hf(Tokenizer.from_file(path))
    control = [spec.tokens[i] for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL]
    print(f"{len(spec.tokens)} tokens, {len(spec.merges)} merges, specials {control}")


if __name__ == "__main__":
    main()
