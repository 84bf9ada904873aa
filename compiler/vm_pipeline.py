"""The Relax pipeline of a CPU build: TVM's default one, then :func:`strip_weight_checks`.

Every Relax function of a model takes all of its weights as parameters (195 for the shipped model), and TVM's
``VMShapeLower`` checks each parameter on every call with two VM builtins: ``vm.builtin.check_tensor_info`` (dtype and
rank) and ``vm.builtin.match_shape`` (its static shape). For the weights that is ~400 interpreted calls a decode
step, ~8 % of the shipped model's CPU step (docs/runtime/README.md, "Weight checks once, at load"). The weights do
not change between calls: the Engine checks every array of ``params.npz`` against the entry's ``meta.json`` once,
when it loads them (:func:`runtime.engine.load_params`). So :func:`strip_weight_checks` drops those per-call checks
of the weight parameters; the inputs, outputs and KV caches keep theirs (a cache's block count is read there). CUDA
builds keep TVM's pipeline: their step is one CUDA graph, which the VM does not interpret call by call.

    python -m pytest -q tests/test_vm_pipeline.py
"""

from __future__ import annotations

CHECKS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")
ASSERT_EQUAL, NO_OP = 0, 2  # codes of vm.builtin.match_shape (TVM's MatchShapeCode) that only check


def _checks_only(call) -> bool:
    """Whether ``call`` is a check of its first argument and nothing more: ``check_tensor_info``, or a
    ``match_shape`` whose every dimension is compared with a constant (none stores a symbolic dimension)."""
    name = str(call.op.global_symbol)
    if name == "vm.builtin.check_tensor_info":
        return True
    ndim = int(call.args[2].value)  # (value, shape_heap, ndim, code_0, value_0, …, error context)
    return all(int(call.args[3 + 2 * i].value) in (ASSERT_EQUAL, NO_OP) for i in range(ndim))


def strip_weight_checks(weights: set[str]):
    """A module pass: in every Relax function, remove the per-call checks of the parameters named in ``weights``
    (their Relax variable names) that only check (:func:`_checks_only`)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Strip(PyExprMutator):
        def visit_var_binding_(self, binding):
            v = binding.value
            if (
                isinstance(v, relax.Call)
                and isinstance(v.op, relax.ExternFunc)
                and str(v.op.global_symbol) in CHECKS
                and isinstance(v.args[0], relax.Var)
                and v.args[0].name in weights
                and _checks_only(v)
            ):
                return
            super().visit_var_binding_(binding)

    @tvm.transform.module_pass(opt_level=0, name="StripWeightChecks")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = Strip().visit_expr(func)
        return mod

    return _pass


def cpu_pipeline(weights: set[str]):
    """TVM's default Relax pipeline, then :func:`strip_weight_checks` of ``weights``."""
    import tvm
    from tvm import relax

    return tvm.transform.Sequential([relax.get_pipeline("default"), strip_weight_checks(weights)])
