"""Model configurations: one dataclass, named presets, the shapes of every ternary matrix, and the limits a
compiled model must respect (context length, memory).

Numpy/stdlib only (no torch): the compiler and the tuner read shapes from here. :meth:`ModelConfig.validate` checks
what any model needs (divisibility, finite in-range floats, ``max_seq_len ≤ MAX_CONTEXT``);
:func:`compile_problems` adds what the compiled graph needs (a context of at least one prefill chunk, static mHC,
even head size, and the memory the build and the runtime would allocate, from :func:`memory_estimate`, within
:func:`memory_limit`). The GGUF reader applies both before anything is allocated.

    python -m model.config            # prints every preset and its ternary matmul shapes
"""

from __future__ import annotations

import logging
import math
import os
import resource
from dataclasses import asdict, dataclass, field, replace

log = logging.getLogger(__name__)

QK = 256  # every ternary matrix's input dimension is a multiple of the TQ2_0 block
# The compiled graph is static in the context: the KV cache, the RoPE tables and the attention scratch are all
# sized by ``max_seq_len``. 32768 is 16x the largest preset; nano-1b's KV cache at 32768 tokens is 2.5 GiB.
MAX_CONTEXT = 1 << 15
MIN_CONTEXT = 16  # one prefill chunk of the CUDA build (the CPU build's is 8)
PREFILL_TOKENS = 16  # the largest prefill chunk: the attention scratch holds one score row per (token, head)
KV_BLOCK = 16  # tokens per block of the runtime's paged cache (compiler.constants.KV_BLOCK, tests/test_lower.py)
# the most sequences the runtime keeps DeltaNet states for by default on any target: the largest compiled decode batch
# (CUDA's 64) plus the engine's own sequence (runtime.engine.default_max_seqs; tests/test_lower.py holds the figure)
MAX_SEQUENCES = 65
NORM_EPS_RANGE = (1e-12, 1.0)  # [inclusive, exclusive): a denormal epsilon flushes to 0 in compiled float32
ROPE_THETA_RANGE = (1.0, 1e12)  # (exclusive, inclusive]: ≤ 1 turns every rotation into one of ≥ 1 radian per step
MAX_EXPERTS = 64  # experts per MoE block (n_experts); llama.cpp's own limit is 256, ours keeps the router kernel serial
MEMORY_ENV = "TERNARY_TVM_MAX_MEMORY_GIB"  # overrides memory_limit()
GiB = 1 << 30
# "bitnet-mhc": ours (SwiGLU, mHC-lite residual streams, optional MTP heads). The foreign ones, as llama.cpp names
# them: "bitnet" (Microsoft's BitNet b1.58: ReLU² gated FFN, an RMSNorm before the output and down projections) and
# "llama" (SwiGLU) whose matrices are ternary (TQ1_0/TQ2_0). Both have a plain residual (n_streams = 1).
ARCHS = ("bitnet-mhc", "bitnet", "llama")
FFN_ACTS = ("silu", "relu2")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def config_problems(c) -> list[tuple[str, str]]:
    """``(field, what is wrong)`` for every constraint ``c`` violates (the text starts with ``field=value``); ``c`` is
    a :class:`ModelConfig` or anything with its fields (the GGUF reader checks its values before building one)."""
    out = []
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
        if getattr(c, name) <= 0:
            out.append((name, f"{name}={getattr(c, name)} must be positive"))
    if out:
        return out  # the checks below divide by these
    if c.d_model % QK:
        out.append(("d_model", f"d_model={c.d_model} is not a multiple of {QK}"))
    if c.ffn_hidden % QK:
        out.append(("ffn_hidden", f"ffn_hidden={c.ffn_hidden} is not a multiple of {QK}"))
    if c.d_model % c.n_heads:
        out.append(("n_heads", f"n_heads={c.n_heads} does not divide d_model={c.d_model}"))
    if c.n_heads % c.n_kv_heads:
        out.append(("n_kv_heads", f"n_kv_heads={c.n_kv_heads} does not divide n_heads={c.n_heads}"))
    if c.n_streams not in (1, 2, 4):
        out.append(("n_streams", f"n_streams={c.n_streams} must be 1, 2 or 4"))
    if c.max_seq_len > MAX_CONTEXT:
        out.append(("max_seq_len", f"max_seq_len={c.max_seq_len} exceeds the maximum context {MAX_CONTEXT}"))
    lo, hi = NORM_EPS_RANGE
    if not (math.isfinite(c.norm_eps) and lo <= c.norm_eps < hi):
        out.append(("norm_eps", f"norm_eps={c.norm_eps} must be finite and in [{lo:g}, {hi:g})"))
    lo, hi = ROPE_THETA_RANGE
    if not (math.isfinite(c.rope_theta) and lo < c.rope_theta <= hi):
        out.append(("rope_theta", f"rope_theta={c.rope_theta} must be finite and in ({lo:g}, {hi:g}]"))
    if c.mtp_heads < 0:
        out.append(("mtp_heads", f"mtp_heads={c.mtp_heads} must be ≥ 0"))
    experts, used = getattr(c, "n_experts", 0), getattr(c, "n_experts_used", 2)
    if experts and not 2 <= experts <= MAX_EXPERTS:
        out.append(("n_experts", f"n_experts={experts} must be 0 (a dense FFN) or between 2 and {MAX_EXPERTS}"))
    elif experts and not 1 <= used <= experts:
        out.append(("n_experts_used", f"n_experts_used={used} must be between 1 and n_experts={experts}"))
    rank, rope = getattr(c, "kv_lora_rank", 0), getattr(c, "qk_rope_dim", 0)
    if rank < 0 or rank % QK:
        out.append(("kv_lora_rank", f"kv_lora_rank={rank} must be 0 (GQA) or a positive multiple of {QK} (the "
                    "ternary attn_kv_b reads the latent)"))  # fmt: skip
    elif rank:
        if c.n_kv_heads != c.n_heads:
            out.append(("n_kv_heads", f"n_kv_heads={c.n_kv_heads}: multi-head latent attention up-projects a key "
                        f"and value for every head (n_kv_heads = n_heads = {c.n_heads})"))  # fmt: skip
        hd = c.d_model // c.n_heads
        if not (2 <= rope <= hd and rope % 2 == 0):
            out.append(("qk_rope_dim", f"qk_rope_dim={rope} must be even and between 2 and head_dim={hd}"))
    interval = getattr(c, "full_attention_interval", 0)
    if interval < 0:
        out.append(("full_attention_interval", f"full_attention_interval={interval} must be ≥ 0"))
    elif interval:
        if rank:
            out.append(("full_attention_interval", "a DeltaNet hybrid's softmax layers are GQA (kv_lora_rank=0)"))
        if c.mtp_heads:  # a speculative verify step rolls the KV cache back; a recurrent state cannot be
            out.append(("mtp_heads", f"mtp_heads={c.mtp_heads}: a DeltaNet hybrid has no draft heads (its recurrent "
                        "state cannot roll back rejected drafts)"))  # fmt: skip
    arch, act = getattr(c, "arch", ARCHS[0]), getattr(c, "ffn_act", FFN_ACTS[0])
    if act not in FFN_ACTS:
        out.append(("ffn_act", f"ffn_act={act!r} must be one of {FFN_ACTS}"))
    elif act != "silu" and arch != "bitnet":
        out.append(("ffn_act", f"ffn_act={act!r}: only arch 'bitnet' has another gate activation than silu"))
    if arch not in ARCHS:
        out.append(("arch", f"arch={arch!r} must be one of {ARCHS}"))
    elif arch != "bitnet-mhc":  # the foreign architectures: a plain residual, no draft heads
        if c.n_streams != 1:
            out.append(("n_streams", f"n_streams={c.n_streams}: arch {arch!r} has a plain residual (n_streams=1)"))
        if c.mtp_heads:
            out.append(("mtp_heads", f"mtp_heads={c.mtp_heads}: arch {arch!r} has no multi-token-prediction heads"))
        if experts:
            out.append(("n_experts", f"n_experts={experts}: arch {arch!r} files with experts are not supported"))
        if getattr(c, "kv_lora_rank", 0):
            out.append(("kv_lora_rank", f"kv_lora_rank={c.kv_lora_rank}: arch {arch!r} has no latent attention"))
        if getattr(c, "full_attention_interval", 0):
            out.append(("full_attention_interval", f"full_attention_interval={c.full_attention_interval}: arch "
                        f"{arch!r} has no DeltaNet layers"))  # fmt: skip
        if arch == "bitnet" and not c.tie_embeddings:  # llama.cpp's bitnet graph has no output.weight
            out.append(
                ("tie_embeddings", "tie_embeddings=False: arch 'bitnet' always ties the LM head to the embedding")
            )
    return out


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
    arch: str = "bitnet-mhc"  # one of ARCHS
    ffn_act: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "relu2" (relu(x)², BitNet b1.58 2B-4T)
    # Mixture of experts (model.moe): 0 = a dense FFN per block; else n_experts ternary SwiGLU experts of ffn_hidden
    # each, a float router, and the top n_experts_used per token (their softmax weights renormalized over the k)
    n_experts: int = 0
    n_experts_used: int = 2
    # Multi-head latent attention (model.mla, DeepSeek-V2): 0 = GQA; else keys and values are up-projected from a
    # per-token latent of kv_lora_rank (what the KV cache stores), and each head's query and the shared key carry a
    # decoupled RoPE part of qk_rope_dim (0: head_dim / 2) beside their head_dim non-rotated dimensions
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    # Gated DeltaNet hybrid (model.deltanet): 0 = every layer softmax attention; n > 0: layer i is softmax attention
    # when (i + 1) % n == 0, else a gated DeltaNet layer (a fixed-size state per KV head instead of a KV cache; q, k,
    # v and output shaped as GQA's). llama.cpp's key for Qwen3-Next's hybrid; n > n_layers: DeltaNet only
    full_attention_interval: int = 0
    filled: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        derived = {}
        if self.n_heads == 0:
            derived["n_heads"] = max(1, self.d_model // 64)
        if self.n_kv_heads == 0:
            derived["n_kv_heads"] = max(1, derived.get("n_heads", self.n_heads) // 2)
        if self.ffn_hidden == 0:
            derived["ffn_hidden"] = _round_up(8 * self.d_model // 3, QK)
        if self.kv_lora_rank and self.qk_rope_dim == 0:
            derived["qk_rope_dim"] = max(2, self.d_model // derived.get("n_heads", self.n_heads) // 2 // 2 * 2)
        for k, v in derived.items():
            object.__setattr__(self, k, v)
        if derived:
            object.__setattr__(self, "filled", tuple(derived))
            log.info("config %s: derived %s", self.name, ", ".join(f"{k}={v}" for k, v in derived.items()))
        self.validate()

    def problems(self) -> list[tuple[str, str]]:
        return config_problems(self)

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid ModelConfig {self.name!r}: " + "; ".join(text for _, text in problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def sub_norms(self) -> bool:
        """An RMSNorm on the attention output before ``attn_output`` and on the FFN's hidden before ``ffn_down``."""
        return self.arch == "bitnet"

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (``kv_lora_rank > 0``) rather than GQA."""
        return self.kv_lora_rank > 0

    def is_deltanet(self, layer: int) -> bool:
        """Layer ``layer`` is a gated DeltaNet layer (not softmax attention)."""
        n = self.full_attention_interval
        return n > 0 and (layer + 1) % n != 0

    @property
    def deltanet_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_deltanet(i))

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: ``qk_rope_dim`` (MLA) or ``head_dim``."""
        return self.qk_rope_dim if self.mla else self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the compiled KV cache holds per token over its softmax-attention layers: GQA float32 keys and values
        (``2 · n_kv_heads · head_dim · 4``); MLA the int8 latent the ternary ``attn_kv_b`` reads, its dequantization
        scale and the rotated key part (``kv_lora_rank + 4 · (1 + qk_rope_dim)``). DeltaNet layers hold no per-token
        cache (their state: :attr:`state_bytes`, per sequence)."""
        per_layer = self.kv_lora_rank + 4 * (1 + self.qk_rope_dim) if self.mla else 8 * self.kv_dim
        return (self.n_layers - len(self.deltanet_layers)) * per_layer

    @property
    def state_bytes(self) -> int:
        """Bytes of a sequence's recurrent state over the DeltaNet layers (float32 ``[head_dim, head_dim]`` per KV
        head), whatever its length."""
        return len(self.deltanet_layers) * self.n_kv_heads * self.head_dim**2 * 4

    @property
    def ffn_copies(self) -> int:
        """FFN weight sets per block: ``n_experts`` (MoE) or 1."""
        return self.n_experts or 1

    @property
    def ffn_active(self) -> int:
        """FFN weight sets a token reads per block: ``n_experts_used`` (MoE) or 1."""
        return self.n_experts_used if self.n_experts else 1

    def ternary_shapes(self) -> dict[str, tuple[int, int]]:
        """(M, K) = (out, in) of each ternary matrix of one block: ``y[M] = W[M, K] · x[K]``."""
        d, f, kv = self.d_model, self.ffn_hidden, self.kv_dim
        ffn = {"ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
        if self.mla:  # q: per head [head_dim | qk_rope_dim]; kv_a: [latent | shared rope key]; kv_b: per head [k | v]
            H, hd, r, c = self.n_heads, self.head_dim, self.qk_rope_dim, self.kv_lora_rank
            return {"attn_q": (H * (hd + r), d), "attn_kv_a_mqa": (c + r, d), "attn_kv_b": (2 * H * hd, c),
                    "attn_o": (d, d), **ffn}  # fmt: skip
        return {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_o": (d, d), **ffn}

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
    # the bigger model (issue 19): ~3x "small", trained on 2048-token windows with the shipped tokenizer
    "base": ModelConfig(name="base", vocab_size=8192, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                        ffn_hidden=2304, max_seq_len=2048),
    # speed benchmarks with random weights
    "nano-125m": ModelConfig(name="nano-125m", vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                             n_kv_heads=4, ffn_hidden=2304, max_seq_len=2048),
    "nano-1b": ModelConfig(name="nano-1b", vocab_size=32000, d_model=2048, n_layers=20, n_heads=16, n_kv_heads=4,
                           ffn_hidden=5632, max_seq_len=2048, tie_embeddings=False),
    # a mixture of experts with the shipped model's attention: 8 experts of 768, top 2 (the active FFN of "small")
    "small-moe": ModelConfig(name="small-moe", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                             ffn_hidden=768, max_seq_len=1024, n_experts=8, n_experts_used=2),
    # multi-head latent attention with the shipped model's other shapes: a 256-wide latent and 32 RoPE dimensions
    "small-mla": ModelConfig(name="small-mla", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                             ffn_hidden=1536, max_seq_len=1024, kv_lora_rank=256, qk_rope_dim=32),
    # a gated DeltaNet hybrid with the shipped model's shapes: DeltaNet, attention, DeltaNet, ... (4 of each)
    "small-deltanet": ModelConfig(name="small-deltanet", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                                  n_kv_heads=4, ffn_hidden=1536, max_seq_len=1024, full_attention_interval=2),
    # the exact shape of Microsoft's BitNet b1.58 2B-4T (llama.cpp arch "bitnet"), for speed benchmarks
    "bitnet-2b4t": ModelConfig(name="bitnet-2b4t", arch="bitnet", ffn_act="relu2", n_streams=1, vocab_size=128256,
                               d_model=2560, n_layers=30, n_heads=20, n_kv_heads=5, ffn_hidden=6912, max_seq_len=4096,
                               rope_theta=500000.0),
}  # fmt: skip


def memory_estimate(cfg: ModelConfig, kv_tokens: int | None = None, sequences: int = MAX_SEQUENCES) -> dict[str, int]:
    """Bytes the compiled model allocates, from the config alone (nothing is allocated here).

    ``build``: the packed parameters (2-bit ternaries, float32 embeddings and LM head as an upper bound, norms) plus
    the RoPE tables and the float64 temporaries ``compiler.graph_kernels.rope_tables`` makes (angles, cos, sin).
    ``runtime``: the packed parameters, the RoPE tables, the KV cache (``runtime.kv_cache.BlockPool``: ``kv_tokens``
    positions, default one context, in whole blocks of :data:`KV_BLOCK`, :attr:`ModelConfig.kv_bytes_per_token`
    each), the DeltaNet layers' states (one :attr:`ModelConfig.state_bytes` slot per sequence live at once: ``min(
    blocks, sequences)``, the pool's ``n_states``; default :data:`MAX_SEQUENCES`, the largest on any target) and the
    attention scratch (``compiler.graph_kernels.attention``: a ``max_seq_len`` score row per (prefill token, head)).
    The parts are returned too."""
    d, rd, ctx = cfg.d_model, cfg.rope_dim, cfg.max_seq_len
    shapes = cfg.ternary_shapes().items()
    per_block = sum(m * k * (cfg.ffn_copies if n.startswith("ffn_") else 1) for n, (m, k) in shapes)
    ternary = cfg.n_layers * per_block + 2 * cfg.mtp_heads * d * d
    router = cfg.n_layers * cfg.n_experts * d * 4
    weights = (
        ternary // 4
        + cfg.vocab_size * d * 4 * (1 if cfg.tie_embeddings else 2)
        + (2 * cfg.n_layers + 1) * d * 4
        + router
    )
    rope = 2 * ctx * (rd // 2) * 4
    blocks = -(-(kv_tokens or ctx) // KV_BLOCK)
    kv_cache = blocks * KV_BLOCK * cfg.kv_bytes_per_token
    state = min(blocks, sequences) * cfg.state_bytes if cfg.state_bytes else 0
    scratch = PREFILL_TOKENS * cfg.n_heads * ctx * 4
    return {"build": weights + rope + 3 * ctx * (rd // 2) * 8, "runtime": weights + rope + kv_cache + state + scratch,
            "weights": weights, "rope_tables": rope, "kv_cache": kv_cache, "state": state}  # fmt: skip


def memory_limit() -> int:
    """What a model may need: ``$TERNARY_TVM_MAX_MEMORY_GIB`` if set, else this machine's physical memory (and the
    process's address-space limit, ``RLIMIT_AS``, when lower)."""
    if os.environ.get(MEMORY_ENV):
        return int(float(os.environ[MEMORY_ENV]) * GiB)
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        limit = 64 * GiB
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return min(limit, soft) if soft != resource.RLIM_INFINITY else limit


def compile_problems(cfg: ModelConfig, limit: int | None = None) -> list[tuple[str, str]]:
    """``(field, what is wrong)`` for what the compiled graph cannot take, beyond :meth:`ModelConfig.problems`: a
    context shorter than a prefill chunk, dynamic mHC, an odd head size (RoPE rotates pairs), or a model whose build
    or runtime would need more than ``limit`` bytes (default :func:`memory_limit`)."""
    out = []
    if cfg.max_seq_len < MIN_CONTEXT:
        out.append(("max_seq_len", f"max_seq_len={cfg.max_seq_len} is below the minimum context {MIN_CONTEXT}"))
    if cfg.mhc_dynamic:
        out.append(("mhc_dynamic", "mhc_dynamic=True is not supported (only static mHC-lite is compiled)"))
    if cfg.rope_dim % 2:
        out.append(("n_heads", f"n_heads={cfg.n_heads} gives head_dim={cfg.head_dim}; RoPE needs an even head_dim"))
    need = memory_estimate(cfg)
    limit = memory_limit() if limit is None else limit
    if max(need["build"], need["runtime"]) > limit:
        g = lambda n: f"{n / GiB:.3g} GiB"  # noqa: E731
        out.append(("max_seq_len", f"max_seq_len={cfg.max_seq_len}: the model needs {g(need['build'])} to build and "
                    f"{g(need['runtime'])} to run (KV cache {g(need['kv_cache'])}, RoPE tables "
                    f"{g(need['rope_tables'])}, weights {g(need['weights'])}), more than the {g(limit)} allowed "
                    f"(physical memory or RLIMIT_AS; ${MEMORY_ENV} overrides)"))  # fmt: skip
    return out


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides (``get_config("tiny", n_streams=4)``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def main() -> None:
    for cfg in PRESETS.values():
        shapes = ", ".join(f"{k} {m}x{kk}" for k, (m, kk) in cfg.ternary_shapes().items())
        moe = f" experts={cfg.n_experts_used}/{cfg.n_experts}" if cfg.n_experts else ""
        print(f"{cfg.name:10s} d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
              f"ffn={cfg.ffn_hidden}{moe} n={cfg.n_streams} vocab={cfg.vocab_size}\n    {shapes}")  # fmt: skip


if __name__ == "__main__":
    main()
