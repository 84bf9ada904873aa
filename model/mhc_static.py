"""Static mHC-lite coefficients in numpy: what the compiler and the runtime fold into their kernels (no torch).

Each mHC site (two per block: attention, then FFN) stores three logit vectors; this module turns them into the
coefficients of the residual update (see ``docs/mhc.md`` and :mod:`model.mhc`, the torch side)::

    h_pre  = sigmoid(pre_logits)                      # (n,)   in (0, 1)
    h_post = 2 · sigmoid(post_logits)                 # (n,)   in (0, 2)
    H_res  = [[a, 1-a], [1-a, a]], a = sigmoid(l)     # n = 2: res_logits has 1 entry
    H_res  = Σ_k softmax(res_logits)_k · P_k          # n = 4: res_logits has 24 entries, P_0 = identity

    u  = h_preᵀ X          X' = H_res · X + h_post ⊗ F(u)      (X is n × d per token)

Everything is computed in float64 and rounded once to float32, in exactly the same order as :mod:`model.mhc`, so the
torch model and the compiled runtime use the same float32 coefficients (a test checks it).

    python -c "from model.mhc_static import PERMUTATIONS_S4; print(PERMUTATIONS_S4[:2])"
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

STREAMS = (1, 2, 4)
PERMUTATIONS_S4: tuple[tuple[int, ...], ...] = tuple(permutations(range(4)))  # index 0 is the identity


def permutation_matrices(n: int = 4) -> np.ndarray:
    """The n! permutation matrices ``P_k[i, perm_k[i]] = 1`` as float64 ``[n!, n, n]`` (index 0 = identity)."""
    perms = tuple(permutations(range(n)))
    p = np.zeros((len(perms), n, n), dtype=np.float64)
    for k, perm in enumerate(perms):
        p[k, np.arange(n), perm] = 1.0
    return p


def res_logits_size(n: int) -> int:
    """How many logits parametrise ``H_res``: 0 for n = 1 (plain residual), 1 for n = 2, 24 for n = 4."""
    if n not in STREAMS:
        raise ValueError(f"n_streams must be one of {STREAMS}, got {n}")
    return {1: 0, 2: 1, 4: 24}[n]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free for any finite x


@dataclass(frozen=True)
class MHCCoefficients:
    """One site's static coefficients, float32: ``h_pre[n]``, ``h_post[n]``, ``h_res[n, n]``."""

    h_pre: np.ndarray
    h_post: np.ndarray
    h_res: np.ndarray


def coefficients(pre_logits: np.ndarray, post_logits: np.ndarray, res_logits: np.ndarray) -> MHCCoefficients:
    """Logits of one site → its float32 coefficients (``n`` is ``len(pre_logits)``)."""
    pre = np.asarray(pre_logits, dtype=np.float64)
    post = np.asarray(post_logits, dtype=np.float64)
    res = np.asarray(res_logits, dtype=np.float64)
    n = pre.shape[0]
    if pre.shape != (n,) or post.shape != (n,) or res.shape != (res_logits_size(n),):
        raise ValueError(f"mHC logits: shapes {pre.shape}, {post.shape}, {res.shape} do not fit n = {n}")
    if n == 1:
        return MHCCoefficients(np.ones(1, np.float32), np.ones(1, np.float32), np.ones((1, 1), np.float32))
    if n == 2:
        a = _sigmoid(res[0])
        h = np.array([[a, 1.0 - a], [1.0 - a, a]])
    else:
        w = np.exp(res - res.max())
        w = w / w.sum()
        h = np.einsum("k,kij->ij", w, permutation_matrices(4))
    return MHCCoefficients(
        h_pre=_sigmoid(pre).astype(np.float32),
        h_post=(2.0 * _sigmoid(post)).astype(np.float32),
        h_res=h.astype(np.float32),
    )
