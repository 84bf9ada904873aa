"""A random-weight GGUF of any preset, for speed benchmarks (e.g. ``nano-1b``, the bandwidth-bound case).

Numpy only (no torch): ternary codes are drawn uniformly from {-1, 0, +1} with a per-tensor scale that keeps
activations O(1) (each expert of an MoE stack gets that scale), embeddings ~ N(0, 0.02²), MoE routers and DeltaNet
gate projections ~ N(0, 1/d) (logits O(1)), DeltaNet's A and dt as Gated DeltaNet initializes them, norms 1 but a
latent attention's ``attn_kv_a_norm`` ~ 1 + N(0, 0.3²), mHC logits at the model's initial values. (The latent is a
ternary matmul's output normed and quantized to int8 directly: with all-ones norm weights its values are
``127·acc_i / acc_max`` for integers ``acc``, so exact .5 ties are common and float rounding decides them; a trained
norm's weights are not all equal, nor are these.) The tokenizer is the 256 byte-level tokens, one merge and the
special tokens, padded to the preset's vocabulary: the file is valid and self-contained, and its text output is
meaningless by design.

    python -m model.random_model --preset nano-1b --out /tmp/nano-1b.gguf
    python -m model.random_model --preset small-moe --out /tmp/small-moe.gguf
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from model.config import ARCHS, ModelConfig, get_config
from model.gguf_io import tensor_specs, write_gguf
from model.ternary.quant import TernaryWeights
from model.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TokenizerSpec

SPECIALS = ("<|endoftext|>", "<|pad|>")


def byte_tokens() -> list[str]:
    """GPT-2's byte → printable-character map: the 256 base tokens of a byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def random_tensors(cfg, seed: int = 0) -> dict[str, np.ndarray | TernaryWeights]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray | TernaryWeights] = {}
    n = cfg.n_streams
    for name, spec in tensor_specs(cfg).items():
        if spec.kind == "ternary":
            codes = rng.integers(-1, 2, size=spec.shape, dtype=np.int8)
            scale = np.float32(np.float16(1.0 / np.sqrt(spec.shape[-1] * 2 / 3)))  # unit-variance outputs
            if len(spec.shape) == 3:  # stacked experts: a scale each
                scale = np.full(spec.shape[0], scale, np.float32)
            out[name] = TernaryWeights(codes, scale)
        elif spec.kind == "embed":
            out[name] = (rng.standard_normal(spec.shape) * 0.02).astype(np.float32)
        elif name.endswith("ffn_gate_inp.weight"):
            out[name] = (rng.standard_normal(spec.shape) / np.sqrt(spec.shape[1])).astype(np.float32)
        elif name.endswith("attn_kv_a_norm.weight"):  # see the module docstring
            out[name] = (1 + 0.3 * rng.standard_normal(spec.shape)).astype(np.float32)
        elif name.endswith(("ssm_alpha.weight", "ssm_beta.weight")):  # DeltaNet gates: logits O(1)
            out[name] = (rng.standard_normal(spec.shape) / np.sqrt(spec.shape[1])).astype(np.float32)
        elif name.endswith("ssm_a"):  # A_log: A uniform in [1, 16] (Gated DeltaNet's initialization)
            out[name] = np.log(rng.uniform(1, 16, spec.shape)).astype(np.float32)
        elif name.endswith("ssm_dt.bias"):  # softplus(bias) = dt, log-uniform in [1e-3, 0.1]
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), spec.shape))
            out[name] = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        elif name.endswith("pre_logits"):
            out[name] = np.where(np.arange(n) == 0, 1.0, -1.0).astype(np.float32)
        elif name.endswith("post_logits"):
            out[name] = np.zeros(n, np.float32)
        elif name.endswith("res_logits"):
            out[name] = (np.full(1, 3.0) if n == 2 else np.r_[0.0, np.full(23, -8.0)]).astype(np.float32)
        else:
            out[name] = np.ones(spec.shape, np.float32)
    return out


def write_random_gguf(config: ModelConfig | str, path: Path, seed: int = 0) -> Path:
    """Write a random-weight GGUF for a config (or a preset name) to ``path``."""
    cfg = get_config(config) if isinstance(config, str) else config
    base = byte_tokens()
    space = base[ord(" ")]
    tokens = [*base, space + space, *SPECIALS]  # one merge (two spaces): GGUF readers expect a non-empty list
    types = [TOKEN_NORMAL] * 257 + [TOKEN_CONTROL] * len(SPECIALS)
    spec = TokenizerSpec(tuple(tokens), (f"{space} {space}",), tuple(types), eos_id=257).padded(cfg.vocab_size)
    write_gguf(path, cfg, random_tensors(cfg, seed), spec, metadata={"benchmark.random_weights": True})
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nano-1b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=ARCHS, help="the preset's architecture replaced (the foreign ones get a plain "
                    "residual and no draft heads)")  # fmt: skip
    args = ap.parse_args(argv)
    cfg = get_config(args.preset)
    if args.arch and args.arch != cfg.arch:
        foreign = args.arch != "bitnet-mhc"
        cfg = replace(
            cfg,
            arch=args.arch,
            n_streams=1 if foreign else cfg.n_streams,
            mtp_heads=0 if foreign else cfg.mtp_heads,
            tie_embeddings=cfg.tie_embeddings or args.arch == "bitnet",
        )
    path = write_random_gguf(cfg, args.out, args.seed)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
