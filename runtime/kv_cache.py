"""The paged KV cache: fixed-size blocks shared by every sequence, a free list, a block table per sequence.

The compiled module (:mod:`compiler.lower`) reads and writes keys and values through block tables: position ``p`` of
a sequence lives in block ``table[p // block]``, slot ``p % block``, of tensors ``[n_blocks, Hkv, block, hd]`` (one
pair per layer). This module owns those tensors' sizes and who holds which block. A sequence takes blocks as it
grows (one every ``block`` tokens) and gives them all back when it ends, so the cache holds as many sequences as their
actual lengths allow, not as many as full contexts would (vLLM's and MLC-LLM's design; llama.cpp's server splits one
cache into fixed slots instead). The memory is bounded by ``tokens`` (``--kv-tokens``).

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


class BlockPool:
    """``n_blocks`` blocks of ``block`` tokens for sequences of at most ``ctx`` tokens."""

    def __init__(self, tokens: int, block: int, ctx: int) -> None:
        if block <= 0 or ctx <= 0:
            raise ValueError(f"block ({block}) and context ({ctx}) must be positive")
        if tokens < ctx:
            raise ValueError(f"a KV cache of {tokens} tokens cannot hold one full context of {ctx}")
        self.block, self.ctx = block, ctx
        self.n_blocks = -(-tokens // block)
        self.width = -(-ctx // block)  # block-table entries per sequence
        self._free = list(range(self.n_blocks - 1, -1, -1))  # pop() hands out low block ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.n_blocks - len(self._free)

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block)

    def can_hold(self, seq: Sequence, length: int) -> bool:
        return self.blocks_for(length) - len(seq.blocks) <= len(self._free)

    def reserve(self, seq: Sequence, length: int) -> bool:
        """Give ``seq`` blocks for positions ``0 .. length - 1``; False (nothing taken) if the pool is short."""
        if length > self.ctx:
            raise ValueError(f"{length} tokens exceed the context of {self.ctx}")
        need = self.blocks_for(length) - len(seq.blocks)
        if need > len(self._free):
            return False
        seq.blocks.extend(self._free.pop() for _ in range(max(need, 0)))
        return True

    def release(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks; it is empty afterwards."""
        self._free.extend(reversed(seq.blocks))
        seq.blocks.clear()
        seq.length, seq.hidden, seq.drafts = 0, None, None
