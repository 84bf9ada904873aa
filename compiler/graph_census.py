"""What one call of each compiled function launches, read from the Relax module after the build pipeline.

A CUDA build (``relax.backend.use_cuda_graph``, :func:`compiler.build._static_inputs`) should run each step as one
replayed CUDA graph: no kernel launched by the host, no device allocation per call. :func:`census` counts, per
public Relax function, the graph replays (``vm.builtin.cuda_graph.run_or_capture``), the kernels inside the captured
graphs, the kernels the host launches itself, and the allocations made on each call (``alloc_storage`` outside the
cached allocation function, ``builtin.alloc_tensor``). ``compiler.build`` writes it to ``meta.json`` (``census``) so
that the GPU host, which has TVM's runtime only, can report kernels per step (``bench.runtime``), and
``tests/test_cuda_batch.py`` fails if a decode step is more than one graph.
"""

from __future__ import annotations

CAPTURE = "vm.builtin.cuda_graph.run_or_capture"
ALLOC_OPS = ("relax.memory.alloc_storage", "relax.vm.alloc_storage", "relax.builtin.alloc_tensor")


def _calls(func):
    """The ``Call`` values bound in a Relax function's body, in order."""
    from tvm import relax

    out = []
    body = func.body
    if isinstance(body, relax.SeqExpr):
        for block in body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call):
                    out.append(b.value)
    return out


def _extern_name(call) -> str | None:
    """The packed function a ``call_builtin_with_ctx`` / ``call_packed`` binding calls, if any."""
    from tvm import relax

    if isinstance(call.op, relax.ExternFunc):
        return str(call.op.global_symbol)
    if call.args and isinstance(call.args[0], relax.ExternFunc):
        return str(call.args[0].global_symbol)
    return None


def _kernels(mod, func) -> int:
    """Calls of PrimFuncs (kernel launches) in ``func``'s body."""
    import tvm
    from tvm import relax

    n = 0
    for c in _calls(func):
        if isinstance(c.op, relax.GlobalVar) and isinstance(mod[c.op], tvm.tirx.PrimFunc):
            n += 1
    return n


def census(mod, names=None) -> dict[str, dict[str, int]]:
    """Per public Relax function (or those in ``names``): ``graphs`` (graph replays per call), ``kernels_in_graphs``,
    ``kernels_outside`` (launched by the host each call) and ``allocations`` (made each call) of ``mod`` after the
    Relax build pipeline."""
    from tvm import relax

    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
    if names is None:  # the module's own functions (compiler.build marks them), not the rewrite's lifted ones
        names = [n for n, f in funcs.items() if f.attrs is not None and "num_input" in f.attrs]
    out = {}
    for name in names:
        f = funcs[name]
        row = {"graphs": 0, "kernels_in_graphs": 0, "kernels_outside": _kernels(mod, f), "allocations": 0}
        for c in _calls(f):
            op = getattr(c.op, "name", None)
            if op in ALLOC_OPS:
                row["allocations"] += 1
            if _extern_name(c) == CAPTURE:
                row["graphs"] += 1
                captured = c.args[1].fields[0]
                if isinstance(captured, relax.GlobalVar) and isinstance(mod[captured], relax.Function):
                    row["kernels_in_graphs"] += _kernels(mod, mod[captured])
        out[name] = row
    return out
