"""Model configurations: one dataclass, named presets, and the shapes of every ternary matrix.

Numpy/stdlib only (no torch): the compiler and the tuner read shapes from here.

    python -m model.config            # prints every preset and its ternary matmul shapes
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

log = logging.getLogger(__name__)

QK = 256  # every ternary matrix's input dimension is a multiple of the TQ2_0 block


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the BitNet-b1.58 + mHC-lite transformer.

    ``d_model`` is the dial: fields left at 0 are derived from it in ``__post_init__`` (and logged):
    ``n_heads = d_model // 64``, ``n_kv_heads = max(1, n_heads // 2)``, ``ffn_hidden ≈ 8/3·d_model`` rounded up to 256.
    """

    name: str = "custom"
    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 0
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    n_streams: int = 2  # mHC-lite streams: 1 (plain residual), 2 or 4
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    mtp_heads: int = 0  # extra multi-token-prediction heads (self-speculative decoding)
    mhc_dynamic: bool = False
    filled: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        derived = {}
        if self.n_heads == 0:
            derived["n_heads"] = max(1, self.d_model // 64)
        if self.n_kv_heads == 0:
            derived["n_kv_heads"] = max(1, derived.get("n_heads", self.n_heads) // 2)
        if self.ffn_hidden == 0:
            derived["ffn_hidden"] = _round_up(8 * self.d_model // 3, QK)
        for k, v in derived.items():
            object.__setattr__(self, k, v)
        if derived:
            object.__setattr__(self, "filled", tuple(derived))
            log.info("config %s: derived %s", self.name, ", ".join(f"{k}={v}" for k, v in derived.items()))
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.d_model % QK:
            problems.append(f"d_model={self.d_model} is not a multiple of {QK}")
        if self.ffn_hidden % QK:
            problems.append(f"ffn_hidden={self.ffn_hidden} is not a multiple of {QK}")
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.n_streams not in (1, 2, 4):
            problems.append(f"n_streams={self.n_streams} must be 1, 2 or 4")
        if min(self.vocab_size, self.n_layers, self.max_seq_len) <= 0:
            problems.append("vocab_size, n_layers and max_seq_len must be positive")
        if problems:
            raise ValueError(f"invalid ModelConfig {self.name!r}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def ternary_shapes(self) -> dict[str, tuple[int, int]]:
        """(M, K) = (out, in) of each ternary matrix of one block: ``y[M] = W[M, K] · x[K]``."""
        d, f, kv = self.d_model, self.ffn_hidden, self.kv_dim
        return {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_o": (d, d),
                "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}  # fmt: skip

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("filled")
        return out


PRESETS: dict[str, ModelConfig] = {
    # CI: seconds on a CPU
    "tiny": ModelConfig(name="tiny", vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_hidden=512, max_seq_len=256),
    # the model we train and ship (~25 M parameters)
    "small": ModelConfig(name="small", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                         ffn_hidden=1536, max_seq_len=1024),
    # speed benchmarks with random weights
    "nano-125m": ModelConfig(name="nano-125m", vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                             n_kv_heads=4, ffn_hidden=2304, max_seq_len=2048),
    "nano-1b": ModelConfig(name="nano-1b", vocab_size=32000, d_model=2048, n_layers=20, n_heads=16, n_kv_heads=4,
                           ffn_hidden=5632, max_seq_len=2048, tie_embeddings=False),
}  # fmt: skip


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides (``get_config("tiny", n_streams=4)``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def main() -> None:
    for cfg in PRESETS.values():
        shapes = ", ".join(f"{k} {m}x{kk}" for k, (m, kk) in cfg.ternary_shapes().items())
        print(f"{cfg.name:10s} d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
              f"ffn={cfg.ffn_hidden} n={cfg.n_streams} vocab={cfg.vocab_size}\n    {shapes}")  # fmt: skip


if __name__ == "__main__":
    main()
