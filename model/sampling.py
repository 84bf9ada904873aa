"""Sampling parameters shared by the PyTorch generation loop (``model.generate``) and the compiled runtime.

Torch-free, so the runtime can import it without pulling in torch. :func:`penalize` applies the repetition controls
(no-repeat n-grams, OpenAI's frequency and presence penalties) to one step's logits, the same way for both loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# sampling noise, drawn alike on the device (compiler.graph_kernels.gumbel, a chain's pick) and on the host
# (runtime.decoding.gumbel_noise): a stream's seed is below SAMPLE_SEEDS (chain_b1 takes it as a float32), hashed with
# MurmurHash3's finalizer (FMIX: its two multipliers) and counters spread by GOLDEN (2^32 / the golden ratio,
# SplitMix's increment)
SAMPLE_SEEDS = 1 << 24
FMIX = (0x85EBCA6B, 0xC2B2AE35)
GOLDEN = 0x9E3779B9
# the noise lies in [-log(-log 2^-24), -log(-log(1 - 2^-24))] = [-2.81, 16.64]: an id whose scaled logit is more than
# this span below the largest one can never win a draw, so neither side computes its noise
GUMBEL_SPAN = 20.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. ``temperature = 0`` is greedy; ``top_k = 0`` and ``top_p = 1`` disable those filters.

    Generation stops at a stop token, a stop string (the text is cut before it), ``max_new_tokens`` or the context
    limit.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    no_repeat_ngram: int = 0  # > 1: never complete an n-gram of this length already in the generated tokens
    frequency_penalty: float = 0.0  # OpenAI's: logit -= frequency_penalty · (times generated so far)
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence_penalty · (generated at least once)
    ignore_eos: bool = False  # (vLLM's, llama.cpp's) end-of-generation tokens do not stop it: benchmarks' fixed lengths

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or not 0 <= self.temperature < math.inf or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling parameters: {self}")
        if (
            self.no_repeat_ngram < 0
            or self.no_repeat_ngram == 1
            or not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2)
        ):
            raise ValueError(f"invalid repetition controls: {self}")

    @property
    def penalized(self) -> bool:
        return bool(self.no_repeat_ngram or self.frequency_penalty or self.presence_penalty)


def penalize(logits, generated: list[int], params: SamplingParams):
    """The repetition controls of ``params`` applied to one step's logits (numpy ``[vocab]``; a new array), given the
    tokens generated so far (the prompt is not counted: code repeats its identifiers legitimately). Greedy and
    sampled decoding both see the adjusted logits."""
    import numpy as np

    out = np.array(logits, dtype=np.float32, copy=True)
    if not generated or not params.penalized:
        return out
    ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
    out[ids] -= params.frequency_penalty * counts + params.presence_penalty
    n = params.no_repeat_ngram
    if n and len(generated) >= n:
        prefix = generated[len(generated) - n + 1 :]
        banned = [generated[i + n - 1] for i in range(len(generated) - n + 1) if generated[i : i + n - 1] == prefix]
        out[banned] = -np.inf
    return out


@dataclass
class Generation:
    """One generation's result, from the PyTorch loop (:func:`model.generate.generate`) or the compiled runtime
    (``runtime.engine.Engine``): the new tokens, their text (cut before a stop string), why it ended, and the
    runtime's timings and token healing (left at their defaults by the PyTorch loop)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # length | stop_token | stop_string | context
    prefill_s: float = 0.0  # time to first token (prefill + first sample)
    decode_s: float = 0.0
    healed: str = ""  # token healing: the prompt's last characters, generated again (``tokens`` spell them first)
    healed_tokens: int = 0  # the prompt tokens they held (backed off; ``tokens`` may hold more or fewer for them)
    drafted: int = 0  # speculative decoding: tokens drafted by the MTP heads, those the main model accepted, and
    accepted: int = 0  # the verify steps that had drafts (each gives its accepted drafts + 1 tokens)
    spec_steps: int = 0
