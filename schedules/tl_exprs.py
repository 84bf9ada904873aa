"""The expressions the table-lookup GEMV's TE compute (``compiler.ops.ternary_gemv_tl``) and its tensor intrinsics
(:mod:`schedules.intrin_x86_tl`) must both build, structurally alike, for tensorize to match them: one table word and
one signed lookup. Here, below both, so neither imports the other; TVM is imported inside the functions.

    python -c "from schedules.tl_exprs import te_term; help(te_term)"
"""

from __future__ import annotations

from model.ternary.layouts_tl import ZERO_CODE


def te_lut_word(xg, h, w):
    """Word ``w`` (entries 8w..8w+7) of byte ``h`` of one group's table, uint64: byte ``i`` is the lo (h = 0) or hi
    byte of ``v = Σ_g t_g·xg(g)`` for the positive combination ``t`` of code ``13 + 8w + i`` (0 past code 26).
    ``xg(g)`` returns the group's activation g (int8). Shared by the TE compute and the table-building intrinsic;
    the four (h, w) words are spelled out with Python-constant digits (± activations, no arithmetic on h or w) so that
    the simplifier leaves both sides alike."""
    import tvm

    i32 = lambda v: tvm.tirx.const(v, "int32")  # noqa: E731

    def word(hc: int, wc: int):
        out = tvm.tirx.const(0, "uint64")
        for i in range(8):
            c = ZERO_CODE + 8 * wc + i
            v = i32(0)
            if c <= 2 * ZERO_CODE:
                for g, digit in enumerate((c // 9 - 1, c // 3 % 3 - 1, c % 3 - 1)):
                    if digit:
                        v = v + xg(g).astype("int32") if digit > 0 else v - xg(g).astype("int32")
            byte = v & i32(255) if hc == 0 else (v >> 8) + i32(2)
            out = out | (byte.astype("uint64") << tvm.tirx.const(8 * i, "uint64"))
        return out

    return tvm.tirx.Select(h == 0, tvm.tirx.Select(w == 0, word(0, 0), word(0, 1)),
                           tvm.tirx.Select(w == 0, word(1, 0), word(1, 1)))  # fmt: skip


def te_term(table_word, nib_byte, sign_byte, half, bit):
    """One lookup times its sign, int32. The 16-byte table is two uint64 words (``table_word(0)``, ``(1)``), and entry
    ``i`` (the nibble ``half`` of ``nib_byte``) is byte ``i % 8`` of word ``i // 8``: the data-dependent part is a
    select and a shift, never a buffer index — tensorize compares indices arithmetically, and an index holding a load
    of W could not be matched. The sign is bit ``bit`` of ``sign_byte``: ``· (1 − 2·bit)``.

    Shared by the TE compute and the tensor intrinsic's description (:mod:`schedules.intrin_x86_tl`): tensorize matches
    the two structurally, so they must build the same expression."""
    import tvm

    u8 = lambda v: tvm.tirx.const(v, "uint8")  # noqa: E731
    index = (nib_byte >> (u8(4) * half.astype("uint8"))) & u8(15)
    word = tvm.tirx.Select(index < u8(8), table_word(0), table_word(1))
    entry = (word >> ((index & u8(7)) * u8(8)).astype("uint64")) & tvm.tirx.const(255, "uint64")
    neg = ((sign_byte >> bit.astype("uint8")) & u8(1)).astype("int32")
    return entry.astype("int32") * (tvm.tirx.const(1, "int32") - tvm.tirx.const(2, "int32") * neg)
