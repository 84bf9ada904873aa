"""Sampling parameters shared by the PyTorch generation loop (``model.generate``) and the compiled runtime.

Torch-free, so the runtime can import it without pulling in torch.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling parameters: {self}")
