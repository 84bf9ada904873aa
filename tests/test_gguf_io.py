"""The GGUF contract: exact round trip, compatibility with the gguf package, and a reader that rejects bad files.

pytest tests/test_gguf_io.py -q
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_helpers import tiny_spec

from model.config import get_config
from model.gguf_io import ARCH, GGMLType, GGUFError, parse_gguf, read_gguf, tensor_specs, write_gguf
from model.ternary.quant import TernaryWeights
from model.transformer import Transformer

FUZZ_PEAK_BYTES = 64 << 20  # a tiny file (~0.6 MB) must never make the reader allocate more than this


def build(tmp_path, name="m.gguf", ternary_type=GGMLType.TQ2_0, embed_type=GGMLType.F16, **overrides):
    torch.manual_seed(0)
    cfg = get_config("tiny", **overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for site in model.mhc_sites():  # non-trivial mHC values so a mix-up of sites would show
            for p in site.parameters():
                p.add_(torch.randn_like(p))
    tensors = model.gguf_tensors()
    path = tmp_path / name
    write_gguf(path, cfg, tensors, tiny_spec(cfg.vocab_size), ternary_type, embed_type, {"training.step": 7})
    return path, cfg, model, tensors


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gguf"), n_streams=4, mtp_heads=1)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("ttype", "etype", "overrides"),
    [(GGMLType.TQ2_0, GGMLType.F16, {"n_streams": 2}), (GGMLType.TQ1_0, GGMLType.F32, {"n_streams": 4}),
     (GGMLType.TQ2_0, GGMLType.F32, {"n_streams": 1, "tie_embeddings": False, "mtp_heads": 2})],
)  # fmt: skip
def test_round_trip_is_exact(tmp_path, ttype, etype, overrides):
    path, cfg, model, tensors = build(tmp_path, ternary_type=ttype, embed_type=etype, **overrides)
    g = read_gguf(path)
    assert g.config == cfg and g.config.name == "tiny"
    assert g.tokenizer == tiny_spec(cfg.vocab_size)
    assert g.ternary_type == ttype and g.metadata["training.step"] == 7
    assert set(g.tensors) == set(tensors) == set(tensor_specs(cfg))
    for name, want in tensors.items():
        got = g.tensors[name]
        if isinstance(want, TernaryWeights):
            tw = got.ternary()
            assert tw.scale == want.scale and np.array_equal(tw.codes, want.codes), name
        else:
            dtype = (
                np.float16 if name in ("token_embd.weight", "output.weight") and etype == GGMLType.F16 else np.float32
            )
            assert got.data.dtype == dtype and np.array_equal(got.data, want.astype(dtype)), name
    if etype == GGMLType.F32:  # with float32 embeddings the model read back is the model written, bit for bit
        again = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()
        idx = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(again(idx), model(idx))
    for ours, theirs in zip(g.mhc_coefficients(), model.mhc_coefficients(), strict=True):
        for a, b in zip(
            (ours.h_pre, ours.h_post, ours.h_res), (theirs.h_pre, theirs.h_post, theirs.h_res), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=2.4e-7)  # ≤ 2 float32 ulps (float64 libm differences)


@pytest.mark.unit
def test_gguf_package_reads_our_files(tiny_file):
    path, cfg, _, _ = tiny_file
    ours = read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == ARCH
    assert reader.fields[f"{ARCH}.block_count"].contents() == cfg.n_layers
    assert reader.fields["tokenizer.ggml.tokens"].contents() == list(ours.tokenizer.tokens)
    assert {t.name for t in reader.tensors} == set(ours.tensors)
    for t in reader.tensors:
        mine = ours.tensors[t.name]
        assert int(t.tensor_type) == int(mine.ggml_type)
        assert tuple(int(n) for n in reversed(t.shape)) == mine.shape
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), mine.data.reshape(-1).view(np.uint8))
        if mine.ggml_type == GGMLType.TQ2_0:  # gguf's own dequantizer agrees with our codes · scale
            deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.array_equal(deq, mine.to_float())


@pytest.mark.e2e
def test_gguf_dump_script_runs(tiny_file):
    out = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_dump", str(tiny_file[0])],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert ARCH in out.stdout and "blk.1.mhc_ffn.res_logits" in out.stdout and "TQ2_0" in out.stdout


# --- malformed and malicious files --------------------------------------------------------------------------------


def rewrite(src, dst, drop_keys=(), set_keys=None, drop_tensors=(), patch_tensors=None, add_tensors=None):
    """Copy a file through gguf.GGUFWriter with keys/tensors dropped, replaced or added (to craft invalid files)."""
    f = parse_gguf(src)
    w = gguf.GGUFWriter(str(dst), f.metadata["general.architecture"])
    for key, value in f.metadata.items():
        if key == "general.architecture" or key in drop_keys or key in (set_keys or {}):
            continue
        vt = gguf.GGUFValueType(int(f.value_types[key]))
        sub = gguf.GGUFValueType(int(f.array_types[key])) if key in f.array_types else None
        w.add_key_value(key, list(value) if sub is not None else value, vt, sub_type=sub)
    for key, (value, vt) in (set_keys or {}).items():
        if key == "general.architecture":
            w.kv_data[0][key] = gguf.GGUFValue(value, vt)
        else:
            w.add_key_value(key, value, vt)
    for name, t in f.tensors.items():
        if name in drop_tensors:
            continue
        data = np.array((patch_tensors or {}).get(name, t.data))
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(int(t.ggml_type)))
    for name, data in (add_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def corrupt_cases(path, tmp_path):
    f = parse_gguf(path)
    norm = f.tensors["output_norm.weight"].data.copy()
    norm[3] = np.nan
    q = f.tensors["blk.0.attn_q.weight"].data.copy()
    q[0, 0] = 0xFF  # the 2-bit code 3 does not exist in TQ2_0
    q2 = f.tensors["blk.0.attn_k.weight"].data.copy()
    q2[1, 64:66] = np.frombuffer(np.float16(0.123).tobytes(), np.uint8)  # a second block scale in one tensor
    u32, string = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    cases = {  # expected message → rewrite() arguments
        "missing metadata key 'bitnet-mhc.block_count'": {"drop_keys": {f"{ARCH}.block_count"}},
        "has type STRING, expected UINT32": {"set_keys": {f"{ARCH}.block_count": ("2", string)}},
        "general.architecture = 'gpt2'; supported": {"set_keys": {"general.architecture": ("gpt2", string)}},
        "hyperparameter bitnet-mhc.mhc.stream_count: n_streams=3": {"set_keys": {f"{ARCH}.mhc.stream_count": (3, u32)}},
        "missing ['blk.1.ffn_up.weight']": {"drop_tensors": {"blk.1.ffn_up.weight"}},
        "output_norm.weight: non-finite": {"patch_tensors": {"output_norm.weight": norm}},
        "invalid 2-bit code 3": {"patch_tensors": {"blk.0.attn_q.weight": q}},
        "distinct block scales": {"patch_tensors": {"blk.0.attn_k.weight": q2}},
        "missing metadata key 'tokenizer.ggml.tokens'": {"drop_keys": {"tokenizer.ggml.tokens"}},
    }
    return {msg: rewrite(path, tmp_path / f"bad{i}.gguf", **kw) for i, (msg, kw) in enumerate(cases.items())}


@pytest.mark.unit
def test_invalid_files_name_the_problem(tiny_file, tmp_path):
    for message, bad in corrupt_cases(tiny_file[0], tmp_path).items():
        with pytest.raises(GGUFError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_gguf(bad)


def put_u64(data: bytearray, at: int, value: int) -> bytes:
    data = bytearray(data)
    data[at : at + 8] = value.to_bytes(8, "little")
    return bytes(data)


@pytest.mark.unit
def test_huge_declared_sizes_fail_fast(tiny_file):
    raw = tiny_file[0].read_bytes()
    tokens_key = raw.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")
    first_token_len = tokens_key + 4 + 4 + 8  # value type, item type, count, then the first string's length
    name_at = raw.index(b"token_embd.weight")
    cases = {
        "cannot fit": put_u64(raw, 8, 1 << 62),  # tensor count
        "metadata keys": put_u64(raw, 16, 1 << 40),  # kv count
        "declared 4611686018427387904 items": put_u64(raw, tokens_key + 8, 1 << 62),  # array count
        "needs 1152921504606846976 bytes": put_u64(raw, first_token_len, 1 << 60),  # string length
        "implausible dims": put_u64(raw, name_at + len(b"token_embd.weight") + 4, 1 << 62),  # a tensor dim
        "not a GGUF file": b"GGUG" + raw[4:],
        "unsupported GGUF version 2": raw[:4] + (2).to_bytes(4, "little") + raw[8:],
    }
    for message, data in cases.items():
        tracemalloc.start()
        with pytest.raises(GGUFError, match=message):
            read_gguf(data)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < FUZZ_PEAK_BYTES, (message, peak)


def data_end(path) -> int:
    f = parse_gguf(path)
    raw = path.read_bytes()
    last = max(f.tensors.values(), key=lambda t: raw.find(t.data.tobytes()[:64]))  # the tensor stored last
    return raw.rfind(last.data.tobytes()) + last.data.nbytes


@pytest.mark.unit
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_truncated_and_bit_flipped_files(tiny_file, data):
    """Any truncation before the end of the tensor data fails with GGUFError; any bit flips either fail with
    GGUFError or yield a file that still validates (e.g. a flipped embedding mantissa) — never another exception,
    a crash, or a large allocation."""
    raw = tiny_file[0].read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, data_end(tiny_file[0]) - 1), label="cut")
        with pytest.raises(GGUFError):
            read_gguf(raw[:cut])
        return
    buf = bytearray(raw)
    header = raw.index(b"token_embd.weight") + 4096  # bias half the flips towards metadata and tensor infos
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        limit = header if data.draw(st.booleans()) else len(buf) - 1
        at = data.draw(st.integers(0, limit), label="at")
        buf[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    tracemalloc.start()
    try:
        read_gguf(bytes(buf))
    except GGUFError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < FUZZ_PEAK_BYTES


@pytest.mark.unit
def test_writer_rejects_inconsistent_input(tmp_path):
    cfg = get_config("tiny")
    tensors = Transformer(cfg).gguf_tensors()
    with pytest.raises(GGUFError, match="missing"):
        write_gguf(tmp_path / "x.gguf", cfg, {k: v for k, v in tensors.items() if k != "output_norm.weight"},
                   tiny_spec())  # fmt: skip
    with pytest.raises(GGUFError, match="vocab_size"):
        write_gguf(tmp_path / "x.gguf", cfg, tensors, tiny_spec(600))
    bad = dict(tensors)
    bad["token_embd.weight"] = bad["token_embd.weight"] * 1e6  # overflows float16
    with pytest.raises(GGUFError, match="non-finite"):
        write_gguf(tmp_path / "x.gguf", cfg, bad, tiny_spec())
    with pytest.raises(GGUFError, match="reserved"):
        write_gguf(tmp_path / "x.gguf", cfg, tensors, tiny_spec(), metadata={"general.name": "x"})
