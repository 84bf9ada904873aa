"""Corpus, tokenizer and token shards (train/corpus.py, train/tokenizer.py, train/shards.py)."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from train.corpus import CorpusConfig, build_corpus, read_manifest, write_manifest
from train.shards import ShardError, build_shards, open_split, write_shards
from train.tokenizer import CHAT_TEMPLATE, EOT, SPECIAL_TOKENS, iter_texts, train_tokenizer

pytestmark = pytest.mark.unit

SOURCE = '''def add(a, b):
    """Add two numbers."""
    return a + b


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
'''


@pytest.fixture
def tree(tmp_path):
    """Two roots of python files: packages, a duplicate, a tiny file, a non-UTF-8 file."""
    root = tmp_path / "src"
    for pkg in ("alpha", "beta", "gamma", "delta"):
        for i in range(6):
            f = root / pkg / f"mod{i}.py"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(SOURCE.replace("add", f"add_{pkg}_{i}"))
    (root / "alpha" / "copy.py").write_text((root / "beta" / "mod1.py").read_text())  # exact duplicate
    (root / "tiny.py").write_text("x=1\n")  # below min_bytes
    (root / "latin1.py").write_bytes(("# caf\xe9\n" * 20).encode("latin-1"))  # not UTF-8
    return root


def test_corpus_dedupes_filters_and_holds_out_whole_packages(tree, tmp_path):
    cfg = CorpusConfig(roots=(str(tree),), holdout_package_frac=0.5, holdout_file_frac=0.0, seed=3)
    corpus = build_corpus(cfg, progress=False)
    assert corpus.skipped == {"exact duplicate": 1, "size out of range": 1, "not UTF-8": 1}
    assert len({f.sha256 for f in corpus.files}) == len(corpus.files) == 24
    by_package = {}
    for f in corpus.files:
        by_package.setdefault(f.package, set()).add(f.split)
    assert all(len(splits) == 1 for splits in by_package.values())  # a package is wholly train or wholly val
    assert {"train", "val"} == set().union(*by_package.values())  # with frac 0.5 over 4 packages: both occur
    manifest = write_manifest(corpus, tmp_path / "out")
    assert read_manifest(manifest) == corpus.files
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train"]["files"] + summary["val"]["files"] == 24
    # deterministic: the same config gives the same split, a different seed may not
    assert build_corpus(cfg, progress=False).files == corpus.files


def test_file_level_holdout_and_missing_root(tree):
    corpus = build_corpus(CorpusConfig(roots=(str(tree),), holdout_package_frac=0.0, holdout_file_frac=0.3),
                          progress=False)  # fmt: skip
    val = corpus.split("val")
    assert 0 < len(val) < len(corpus.files)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_corpus(CorpusConfig(roots=(str(tree / "nope"),)), progress=False)


DOCTESTED = '''def twice(x):
    """Twice x.

    >>> twice(2)
    4
    """
    return 2 * x
'''


def test_exec_split_holds_out_only_train_files_with_doctests(tree):
    """``exec_file_frac``: files with doctests become split ``exec`` by a hash of their name; files without doctests
    stay ``train``; ``val`` is the same as without the exec split; frac 0 and 1 are none and all."""
    for pkg in ("alpha", "beta", "gamma", "delta"):
        for i in range(6):
            (tree / pkg / f"doc{i}.py").write_text(DOCTESTED.replace("twice", f"twice_{pkg}_{i}"))
    method = textwrap.indent(DOCTESTED.replace("def twice(x)", "def twice(self, x)"), "    ")
    (tree / "alpha" / "method.py").write_text("class A:\n" + method)
    (tree / "alpha" / "dunder.py").write_text(DOCTESTED.replace("twice", "__twice__"))  # not a candidate
    base = dict(roots=(str(tree),), holdout_package_frac=0.25, holdout_file_frac=0.1, seed=1)
    plain = build_corpus(CorpusConfig(**base), progress=False)
    half = build_corpus(CorpusConfig(**base, exec_file_frac=0.5), progress=False)
    every = build_corpus(CorpusConfig(**base, exec_file_frac=1.0), progress=False)
    split = {f.path: f.split for f in plain.files}
    doc = {f.path for f in plain.files if Path(f.path).name.startswith(("doc", "method"))}
    assert {f.path for f in half.split("val")} == {f.path for f in plain.split("val")}
    assert {f.path for f in every.split("exec")} == {p for p in doc if split[p] == "train"}
    held = {f.path for f in half.split("exec")}
    assert held <= doc and 0 < len(held) < len(doc & {p for p, s in split.items() if s == "train"})
    assert not plain.split("exec") and "exec" not in plain.summary()
    assert half.summary()["exec"]["files"] == len(held)
    assert build_corpus(CorpusConfig(**base, exec_file_frac=0.5), progress=False).files == half.files


def test_tokenizer_is_lossless_with_specials_first(tree):
    texts = [p.read_text() for p in sorted(tree.rglob("mod*.py"))]
    tok = train_tokenizer(texts * 3, vocab_size=300)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for sample in [SOURCE, "naïve ünïcode → ✓ 🐍\n\t\r", "<|endoftext|> literally"]:
        assert tok.decode(tok.encode(sample).ids, skip_special_tokens=False) == sample
    assert len(tok.encode(SOURCE).ids) < len(SOURCE.encode()) / 1.5  # merges were learned: fewer tokens than bytes
    assert "<|assistant|>" in CHAT_TEMPLATE
    with pytest.raises(ValueError, match="cannot hold"):
        train_tokenizer(texts, vocab_size=100)


def test_iter_texts_stops_at_the_byte_budget(tree):
    files = build_corpus(CorpusConfig(roots=(str(tree),), holdout_package_frac=0.0), progress=False).files
    assert sum(len(t) for t in iter_texts(files, max_bytes=1)) <= max(f.size for f in files)
    assert len(list(iter_texts(files, max_bytes=None))) == len(files)


def test_shards_round_trip_and_reject_mismatches(tree, tmp_path):
    corpus = build_corpus(CorpusConfig(roots=(str(tree),), holdout_package_frac=0.5, seed=3), progress=False)
    manifest = write_manifest(corpus, tmp_path / "c")
    tok = train_tokenizer([p.read_text() for p in tree.rglob("mod*.py")], vocab_size=300)
    tok.save(str(tmp_path / "tok.json"))
    meta = build_shards(manifest, tmp_path / "tok.json", tmp_path / "s")
    train = open_split(tmp_path / "s", "train", tmp_path / "tok.json")
    assert train.dtype == np.uint16 and train.size == meta["splits"]["train"]["tokens"]
    n_docs = meta["splits"]["train"]["files"]
    assert int((train == tok.token_to_id(EOT)).sum()) == n_docs  # one boundary after every document
    first_doc = np.asarray(train[: int(np.argmax(train == 0))])
    assert tok.decode(first_doc.tolist()).startswith("def add_") or "class Point" in tok.decode(first_doc.tolist())

    other = train_tokenizer(["something else entirely"] * 10, vocab_size=280)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ShardError, match="different tokenizer"):
        open_split(tmp_path / "s", "train", tmp_path / "other.json")


def test_shard_width_and_range_are_checked(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    write_shards(tmp_path, {"train": tokens}, vocab_size=100, tokenizer_sha256="x", eot=0)
    assert np.array_equal(open_split(tmp_path, "train"), tokens)
    np.save(tmp_path / "train.npy", tokens.astype(np.uint32))  # the predecessor's wrong-width bug
    with pytest.raises(ShardError, match="expected 1-D uint16"):
        open_split(tmp_path, "train")
    write_shards(tmp_path, {"train": tokens}, vocab_size=50, tokenizer_sha256="x", eot=0)
    with pytest.raises(ShardError, match="vocab size"):
        open_split(tmp_path, "train")
    np.save(tmp_path / "train.npy", tokens[:10])
    with pytest.raises(ShardError, match=r"meta\.json says"):
        open_split(tmp_path, "train")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ShardError, match="unreadable"):
        open_split(tmp_path, "train")
    with pytest.raises(ShardError, match="uint16"):
        write_shards(tmp_path, {"train": tokens.astype(np.int32)}, vocab_size=100, tokenizer_sha256="x", eot=0)
