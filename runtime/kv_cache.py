"""The paged KV cache: fixed-size blocks shared by every sequence, a free list, a block table per sequence.

The compiled module (:mod:`compiler.lower`) reads and writes keys and values through block tables: position ``p`` of
a sequence lives in block ``table[p // block]``, slot ``p % block``, of tensors ``[n_blocks, Hkv, block, hd]`` (one
pair per layer). This module owns those tensors' sizes and who holds which block. A sequence takes blocks as it
grows (one every ``block`` tokens) and gives them all back when it ends, so the cache holds as many sequences as their
actual lengths allow, not as many as full contexts would (vLLM's and MLC-LLM's design; llama.cpp's server splits one
cache into fixed slots instead). The memory is bounded by ``tokens`` (``--kv-tokens``).

A model with gated DeltaNet layers also has, per such layer, a recurrent state tensor ``[n_states, Hk, hd, hd]``
(:mod:`compiler.graph_kernels_deltanet`): one state per sequence, in the slot its FIRST block's id indexes
(``table[0]``). The pool then reserves the low block ids ``[0, n_states)`` for first blocks (``sequences``:
``n_states = min(n_blocks, sequences)``, the most sequences live at once): a sequence's first block always comes from
there, its later blocks from ``[n_states, n_blocks)`` while any is free (else from the reserved range). When no
reserved block is free a new sequence is refused (``reserve`` returns False; the engine raises :class:`CacheFull`)
while the sequences already holding one grow as before. With ``sequences=0`` (no DeltaNet layer) there is no
reserved range. :func:`cache_layout` reads ``meta.json["cache"]``: which of the two leading dimensions each cache
tensor has.

    pool = BlockPool(tokens=4096, block=16, ctx=1024)
    seq = Sequence()
    pool.reserve(seq, 40)       # blocks for positions 0..39 (3 blocks); False if the pool cannot hold them
    seq.table(pool.width)       # its block-table row for the compiled module
    pool.release(seq)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class CacheFull(RuntimeError):
    """The pool has fewer free blocks than a sequence needs."""


@dataclass
class Sequence:
    """One sequence's place in the cache: its blocks, in position order, and how many positions hold keys."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    hidden: np.ndarray | None = None  # the normed hidden state at the last position (models with MTP heads)
    drafts: np.ndarray | None = None  # the drafts a fused decode step made after ``drafts_after`` from ``hidden``
    drafts_after: int = -1

    def table(self, width: int) -> np.ndarray:
        """The block-table row (int32, ``width`` entries; entries past the sequence's blocks are never read)."""
        row = np.zeros(width, np.int32)
        row[: len(self.blocks)] = self.blocks
        return row


BLOCK_DIM, STATE_DIM = "n_blocks", "n_states"  # the cache tensors' symbolic leading dimensions (compiler.lower)


def cache_layout(entries: list) -> list[tuple[str, str, tuple[int, ...], str]]:
    """``(name, leading dimension, shape after it, dtype)`` per cache tensor of ``meta.json["cache"]``: entries
    ``[name, shape, dtype, dim]`` with ``dim`` :data:`BLOCK_DIM` or :data:`STATE_DIM`. An entry without ``dim`` (a
    module built before the state pool, whose every cache tensor had ``n_blocks`` rows) is :data:`BLOCK_DIM`; any
    other ``dim`` is a ``ValueError`` that asks for a rebuild."""
    out = []
    for e in entries:
        name, shape, dtype, dim = (*e, BLOCK_DIM) if len(e) == 3 else e
        if dim not in (BLOCK_DIM, STATE_DIM):
            raise ValueError(f"cache tensor {name}: unknown leading dimension {dim!r} (a module built by another "
                             "version of the compiler: rebuild it, compiler.build --force)")  # fmt: skip
        out.append((name, dim, tuple(int(n) for n in shape), dtype))
    return out


def cache_shapes(layout: list, pool: BlockPool) -> list[tuple[tuple[int, ...], str]]:
    """The ``(shape, dtype)`` to allocate per cache tensor of ``layout`` (:func:`cache_layout`): ``pool.n_blocks`` or
    ``pool.n_states`` rows, then the tensor's shape."""
    rows = {BLOCK_DIM: pool.n_blocks, STATE_DIM: pool.n_states}
    return [((rows[dim], *shape), dtype) for _, dim, shape, dtype in layout]


class BlockPool:
    """``n_blocks`` blocks of ``block`` tokens for sequences of at most ``ctx`` tokens; with ``sequences > 0`` (a
    model with recurrent states) the ids ``[0, n_states)``, ``n_states = min(n_blocks, sequences)``, are kept for
    sequences' first blocks (see the module docstring)."""

    def __init__(self, tokens: int, block: int, ctx: int, sequences: int = 0) -> None:
        if block <= 0 or ctx <= 0:
            raise ValueError(f"block ({block}) and context ({ctx}) must be positive")
        if tokens < ctx:
            raise ValueError(f"a KV cache of {tokens} tokens cannot hold one full context of {ctx}")
        if sequences < 0:
            raise ValueError(f"sequences ({sequences}) must be at least 0")
        self.block, self.ctx = block, ctx
        self.n_blocks = -(-tokens // block)
        self.width = -(-ctx // block)  # block-table entries per sequence
        self.n_states = min(self.n_blocks, sequences)  # 0: no reserved range
        # pop() hands out low block ids first: first blocks from _low (the reserved range), the others from _high
        self._low = list(range(self.n_states - 1, -1, -1))
        self._high = list(range(self.n_blocks - 1, self.n_states - 1, -1))

    @property
    def free(self) -> int:
        return len(self._low) + len(self._high)

    @property
    def free_states(self) -> int:
        """Reserved first blocks not held (0 without a reserved range)."""
        return len(self._low)

    @property
    def used(self) -> int:
        return self.n_blocks - self.free

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block)

    def _needs_state(self, seq: Sequence, need: int) -> bool:
        return self.n_states > 0 and need > 0 and not seq.blocks

    def can_hold(self, seq: Sequence, length: int) -> bool:
        need = self.blocks_for(length) - len(seq.blocks)
        return need <= self.free and not (self._needs_state(seq, need) and not self._low)

    def reserve(self, seq: Sequence, length: int) -> bool:
        """Give ``seq`` blocks for positions ``0 .. length - 1``; False (nothing taken) if the pool is short (or,
        with a reserved range, ``seq`` has no block yet and no reserved one is free)."""
        if length > self.ctx:
            raise ValueError(f"{length} tokens exceed the context of {self.ctx}")
        if not self.can_hold(seq, length):
            return False
        need = self.blocks_for(length) - len(seq.blocks)
        if self._needs_state(seq, need):
            seq.blocks.append(self._low.pop())
            need -= 1
        seq.blocks.extend((self._high or self._low).pop() for _ in range(max(need, 0)))
        return True

    def release(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks; it is empty afterwards."""
        for b in reversed(seq.blocks):
            (self._low if b < self.n_states else self._high).append(b)
        seq.blocks.clear()
        seq.length, seq.hidden, seq.drafts = 0, None, None
