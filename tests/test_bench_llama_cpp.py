"""bench.llama_cpp's pure pieces, without llama-cpp-python (a benchmark peer, not a test dependency): the bytes a
llama.cpp decode step reads from a GGUF against a hand count, the bounds and ours / llama.cpp ratios on fabricated
rows, the table, the named setups, the CLI's help and its exit when llama_cpp is missing.

pytest tests/test_bench_llama_cpp.py -q
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest

from bench import llama_cpp as peer
from model.config import get_config
from model.random_model import write_random_gguf

pytestmark = pytest.mark.unit

TQ2_0_BLOCK = 66  # bytes per 256 ternary weights: 64 bytes of 2-bit codes + an F16 scale


@pytest.mark.parametrize(
    "arch, tied",
    [("llama", True), ("llama", False), ("bitnet", True)],
    ids=["llama-tied", "llama-untied", "bitnet"],
)
def test_gguf_decode_bytes_is_the_hand_count(tmp_path, arch, tied):
    cfg = replace(get_config("tiny"), arch=arch, n_streams=1, mtp_heads=0, tie_embeddings=tied)
    path = write_random_gguf(cfg, tmp_path / "m.gguf")
    d, f, kv, layers, vocab = 256, 512, 128, 2, 512  # tiny: heads 4 / 2 of 64
    assert (cfg.d_model, cfg.ffn_hidden, cfg.kv_dim, cfg.n_layers, cfg.vocab_size) == (d, f, kv, layers, vocab)
    # rows x 256-blocks per row: q, k, v, o, gate, up over d = one block each; down over f = two blocks
    ternary = layers * TQ2_0_BLOCK * ((d + kv + kv + d + f + f) * (d // 256) + d * (f // 256))
    assert ternary == 304128
    norms = layers * 2 * d * 4 + d * 4  # attn_norm, ffn_norm per layer + output_norm, F32
    if arch == "bitnet":
        norms += layers * (d + f) * 4  # attn_sub_norm (d) and ffn_sub_norm (f)
    b = peer.gguf_decode_bytes(path, pos=9)
    assert b["ternary"] == ternary and b["norms"] == norms
    assert b["lm_head"] == vocab * d * 2  # F16: output.weight, or the tied token_embd.weight read in full
    assert b["embedding_row"] == d * 2 and b["other"] == 0
    assert b["weights"] == ternary + norms + vocab * d * 2 + d * 2
    assert b["kv_cache"] == 2 * layers * kv * 2 * 10  # F16 keys and values of positions 0..9
    assert b["ternary_types"] == ["TQ2_0"]
    assert b["ternary"] * 8 / (layers * (2 * d * d + 2 * kv * d + 3 * f * d)) == pytest.approx(2.0625)


def _row(impl, weights, threads, decode, prefill, nbytes, runs=1, tokens=(1, 2, 3), top5=(1, 5, 6, 7, 8)):
    return {"impl": impl, "weights": weights, "threads": threads, "prompt_tokens": 64, "decode_tok_s": decode,
            "prefill_tok_s": prefill, "ttft_ms": 64e3 / prefill, "peak_rss_mib": 1.0, "mean_decode_pos": 95.5,
            "bytes": {"ternary": nbytes, "lm_head": 0, "norms": 0, "embedding_row": 0, "other": 0,
                      "weights": nbytes, "kv_cache": 0},
            "tokens": list(tokens), "top5": list(top5), "top5_logits": [3.0, 2.5, 2.0, 1.0, 0.5]}  # fmt: skip


def test_bounds_and_ratios_on_fabricated_rows():
    rows = [_row("ours", "tile8", 1, 10.0, 100.0, 1e9), _row("llama.cpp", "TQ2_0", 1, 8.0, 50.0, 1.25e9),
            _row("ours", "tile8", 2, 18.0, 150.0, 1e9), _row("llama.cpp", "TQ2_0", 2, 12.0, 100.0, 1.25e9)]  # fmt: skip
    peer.add_bounds(rows, {1: 20.0, 2: 30.0})
    o1, l1, o2, l2 = rows
    assert o1["bound_tok_s"] == pytest.approx(20.0) and o1["pct_of_bound"] == pytest.approx(50.0)
    assert l1["bound_tok_s"] == pytest.approx(16.0) and l1["pct_of_bound"] == pytest.approx(50.0)
    assert o2["pct_of_bound"] == pytest.approx(60.0) and l2["pct_of_bound"] == pytest.approx(50.0)
    assert o1["decode_gbs"] == pytest.approx(10.0) and l1["decode_gbs"] == pytest.approx(10.0)
    assert o1["prefill_bound_tok_s"] == pytest.approx(64 * 20.0)  # the weights read once for the whole prompt
    assert o1["prefill_pct_of_bound"] == pytest.approx(100 * 100 / 1280)
    assert o1["decode_vs_llama_cpp"] == pytest.approx(1.25) and o1["prefill_vs_llama_cpp"] == pytest.approx(2.0)
    assert o2["decode_vs_llama_cpp"] == pytest.approx(1.5) and o2["prefill_vs_llama_cpp"] == pytest.approx(1.5)
    assert "decode_vs_llama_cpp" not in l1  # only our rows carry the ratios
    lone = peer.add_bounds([_row("ours", "tl", 4, 5.0, 10.0, 1e9)], {})[0]  # no peer row, no roof at 4 threads
    assert math.isnan(lone["decode_vs_llama_cpp"]) and "pct_of_bound" not in lone


def test_summarize_takes_medians_interleaved_runs_and_the_greedy_check():
    runs = ((9.0, 90.0), (11.0, 110.0), (10.0, 80.0))
    samples = {
        ("ours", "tile8", 1): [_row("ours", "tile8", 1, d, p, 1e9) for d, p in runs],
        ("llama.cpp", "-", 1): [_row("llama.cpp", "TQ2_0", 1, d, 50.0, 1.25e9, tokens=(1, 2, 4), top5=(1, 5, 9, 10, 11))
                                for d in (7.0, 8.0, 9.0)],
    }  # fmt: skip
    res = peer.summarize("m", {"same_function": True, "notes": []}, samples, {1: [19.0, 20.0, 30.0]})
    ours, llama = res["rows"]
    assert llama["impl"] == "llama.cpp" and llama["decode_tok_s"] == 8.0
    assert res["read_gbs"] == {1: 20.0} and ours["runs"] == 3 and ours["model"] == "m"
    assert ours["decode_tok_s"] == 10.0 and ours["decode_tok_s_range"] == [9.0, 11.0]
    assert ours["prefill_tok_s"] == 90.0 and ours["prefill_tok_s_range"] == [80.0, 110.0]  # the medians of each
    assert ours["decode_vs_llama_cpp"] == pytest.approx(10.0 / 8.0)
    assert "tokens" not in ours  # the greedy sequences are only for the check
    (check,) = res["argmax_check"]
    assert check["first_match"] and check["top5_overlap"] == 2 and check["greedy_tokens_agreeing"] == 2
    assert check["ours_top2_gap"] == pytest.approx(0.5)
    text = peer.table({**res, "gguf": "m.gguf", "arch": "llama", "ffn_act": "silu", "roof_mib": 512})
    assert "1.80x, 1.25x" in text and "medians of 3" in text and "greedy check" in text
    other = peer.summarize("m", {"same_function": False}, samples, {1: [20.0]})
    assert other["argmax_check"] == []  # relu² bitnet: llama.cpp computes silu, no token comparison


def test_named_setups():
    b = peer.setup_config("bitnet-2b4t")
    assert (b.arch, b.ffn_act, b.n_layers, b.d_model, b.ffn_hidden, b.n_heads, b.n_kv_heads, b.vocab_size) == (
        "bitnet", "relu2", 30, 2560, 6912, 20, 5, 128256)  # fmt: skip
    n = peer.setup_config("nano-1b-llama")
    assert (n.arch, n.n_streams, n.mtp_heads, n.tie_embeddings, n.d_model) == ("llama", 1, 0, False, 2048)
    t = peer.setup_config("tiny-bitnet")
    assert (t.arch, t.n_streams, t.tie_embeddings) == ("bitnet", 1, True)
    with pytest.raises(SystemExit, match="unknown model"):
        peer.setup_config("nano-1b-gpt")


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        peer.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--models", "--gguf", "--threads", "--runs", "--weights", "--workdir", "--json", "--prompt-tokens"):
        assert opt in out


def test_without_llama_cpp_exits_2_naming_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as in CI, where it is not installed
    assert not peer.have_llama_cpp()
    assert peer.main(["--gguf", str(tmp_path / "m.gguf"), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install llama-cpp-python" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written or built
