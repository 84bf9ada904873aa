"""The tokenizer as the GGUF file stores it (``tokenizer.ggml.*``), and conversion to and from HF ``tokenizers``.

Byte-level BPE in the GPT-2 convention (``tokenizer.ggml.model = "gpt2"``): tokens are the byte-level-encoded
strings (``"Ġdef"``), merges are ``"left right"`` strings in priority order, token types follow llama.cpp
(1 normal, 3 control = special, 5 unused). The HF pipeline rebuilt by :func:`hf_from_spec` is the one ``train/``
trains: ``ByteLevel(add_prefix_space=False)`` pre-tokenizer (GPT-2 regex), ``ByteLevel`` decoder, no post-processor,
special tokens as added tokens. No torch here: the runtime imports this module.

    python -m model.tokenizer data/tokenizer.json     # prints the spec summary of a tokenizer.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
TOKEN_TYPES = (1, 2, 3, 4, 5, 6)  # llama.cpp: normal, unknown, control, user-defined, unused, byte
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 pre-tokenizer regex


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

    def padded(self, vocab_size: int) -> TokenizerSpec:
        """Fill the vocabulary up to ``vocab_size`` with unused ``<|unused_i|>`` tokens (a model may be larger)."""
        missing = vocab_size - len(self.tokens)
        if missing < 0:
            raise TokenizerError(f"tokenizer has {len(self.tokens)} tokens, more than vocab_size {vocab_size}")
        fill = tuple(f"<|unused_{i}|>" for i in range(missing))
        return replace(self, tokens=self.tokens + fill, token_type=self.token_type + (TOKEN_UNUSED,) * missing)


def spec_from_hf(
    tok, chat_template: str | None = None, bos: str | None = None, eos: str | None = None
) -> TokenizerSpec:
    """A trained HF byte-level BPE ``tokenizers.Tokenizer`` → :class:`TokenizerSpec` (``bos``/``eos`` by content)."""
    data = json.loads(tok.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"expected a BPE model, got {model.get('type')!r}")
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise TokenizerError(f"expected a ByteLevel(add_prefix_space=False) pre-tokenizer, got {pre}")
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise TokenizerError("token ids are not contiguous from 0")
    tokens = [""] * len(ids)
    for text, i in vocab.items():
        tokens[i] = text
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    types = tuple(TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(len(tokens)))
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []))
    spec = TokenizerSpec(tuple(tokens), merges, types, chat_template=chat_template,
                         bos_id=vocab[bos] if bos else None, eos_id=vocab[eos] if eos else None)  # fmt: skip
    spec.validate()
    return spec


def hf_from_spec(spec: TokenizerSpec):
    """:class:`TokenizerSpec` → an HF ``tokenizers.Tokenizer`` that encodes and decodes like the trained one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    spec.validate()
    vocab = {t: i for i, t in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ")) for m in spec.merges]  # validate() checked that they name known tokens
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(spec.tokens[i], special=True, normalized=False)
                            for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL])  # fmt: skip
    return tok


def main(argv: list[str] | None = None) -> None:
    from tokenizers import Tokenizer

    path = (argv or sys.argv[1:])[0]
    spec = spec_from_hf(Tokenizer.from_file(path))
    control = [spec.tokens[i] for i, t in enumerate(spec.token_type) if t == TOKEN_CONTROL]
    print(f"{len(spec.tokens)} tokens, {len(spec.merges)} merges, specials {control}")


if __name__ == "__main__":
    main()
