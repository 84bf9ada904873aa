"""The CPU build's Relax pipeline (:mod:`compiler.vm_pipeline`) drops the per-call checks of the weights and only
those, and the Engine checks the weights once instead, when it loads them (:func:`runtime.engine.load_params`)."""

from __future__ import annotations

import numpy as np
import pytest

import targets
from compiler.vm_pipeline import cpu_pipeline


def _module():
    """``main(x [4] f32, w_weight [4] f32, v_weight [n] f32)``: x + w, and v's symbolic length ``n`` is read."""
    from tvm import relax, tirx

    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    w = relax.Var("w_weight", relax.TensorType((4,), "float32"))
    v = relax.Var("v_weight", relax.TensorType((n,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, v]):
        out = bb.emit(relax.op.add(x, w))
        bb.emit_func_output(out)
    return bb.get()


def _lowered(weights: set[str]) -> str:
    import tvm

    with targets.get_target("avx2"), tvm.transform.PassContext(opt_level=3):
        return cpu_pipeline(weights)(_module())["main"].script()


def _checks(script: str, param: str) -> int:
    return sum(1 for line in script.splitlines() if "vm.builtin." in line and f", {param}, " in line.replace("(", ", "))


@pytest.mark.unit
def test_only_the_weights_lose_their_checks():
    before, after = _lowered(set()), _lowered({"w_weight", "v_weight"})
    assert _checks(before, "x") == _checks(after, "x") == 2  # check_tensor_info and match_shape
    assert _checks(before, "w_weight") == 2 and _checks(after, "w_weight") == 0
    # v's match_shape stores its symbolic length: it stays; its pure check goes
    assert _checks(before, "v_weight") == 2 and _checks(after, "v_weight") == 1
    assert 'vm.builtin.match_shape", v_weight' in after


@pytest.mark.build
def test_the_compiled_function_still_checks_its_inputs():
    import tvm

    pipeline = cpu_pipeline({"w_weight", "v_weight"})
    ex = tvm.compile(_module(), target=targets.get_target("avx2"), relax_pipeline=pipeline)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    x, w, v = (np.arange(4, dtype=np.float32) for _ in range(3))
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(v)).numpy()
    assert np.array_equal(got, x + w)
    with pytest.raises(Exception, match="x"):  # an input of the wrong dtype is still refused, naming it
        vm["main"](tvm.runtime.tensor(x.astype(np.int32)), tvm.runtime.tensor(w), tvm.runtime.tensor(v))


@pytest.mark.unit
def test_load_params_refuses_a_mismatched_entry(tmp_path):
    import tvm

    from runtime.engine import load_params

    specs = [["a.weight", [2, 3], "int8"], ["b.scale", [3], "float32"]]
    good = {"a.weight": np.zeros((2, 3), np.int8), "b.scale": np.ones(3, np.float32)}
    np.savez(tmp_path / "params.npz", **good)
    got = load_params(tmp_path, specs, tvm.cpu())
    assert [t.numpy().tolist() for t in got] == [a.tolist() for a in good.values()]
    for bad, why in [({**good, "a.weight": np.zeros((3, 2), np.int8)}, r"'a.weight' is int8\[3, 2\]"),
                     ({**good, "b.scale": np.ones(3, np.float16)}, r"'b.scale' is float16"),
                     ({"a.weight": good["a.weight"]}, r"has no 'b.scale'")]:  # fmt: skip
        np.savez(tmp_path / "params.npz", **bad)
        with pytest.raises(ValueError, match=why):
            load_params(tmp_path, specs, tvm.cpu())
