"""ORT's int8 MatMuls get uint8 weights where its u8s8 kernel would saturate: the CPU-feature decision, the
rewrite (exact integer results on any CPU), the cases it must leave alone, and the load-time refusal of
int8-weight artifacts on CPUs without VNNI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compilekit.targets import ort_int8
from compilekit.targets.ort_int8 import (cpu_flags, int8_weights_as_uint8, resolve_int8_weights,
                                         signed_int8_exact)

M, K, N = 64, 96, 48


def test_cpu_flags_reads_linux_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags(x86) == frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
    assert cpu_flags(arm) == frozenset({"fp", "asimd", "asimddp"})
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.parametrize(("machine", "flags", "exact"), [
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, True),
    ("x86_64", {"avx2", "avx_vnni"}, True),
    ("AMD64", {"avx2", "avx512_vnni"}, True),
    ("x86_64", {"avx2", "fma"}, False),             # AVX2 only: vpmaddubsw saturates
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, False),  # AVX-512 without VNNI saturates too
    ("aarch64", {"asimd", "asimddp"}, False),        # not known to be exact: uint8
    ("x86_64", None, False),                          # flags unknown: uint8
])
def test_signed_int8_is_exact_only_on_x86_with_vnni(machine, flags, exact, monkeypatch):
    monkeypatch.setattr(ort_int8, "cpu_flags", lambda: None)  # `None` in the table must not read this CPU's flags
    assert signed_int8_exact(frozenset(flags) if flags is not None else None, machine) is exact


def test_resolve_keeps_an_explicit_setting(monkeypatch):
    monkeypatch.setattr(ort_int8, "signed_int8_exact", lambda: True)
    assert resolve_int8_weights("auto") == "int8"
    assert resolve_int8_weights("uint8") == "uint8"
    monkeypatch.setattr(ort_int8, "signed_int8_exact", lambda: False)
    assert resolve_int8_weights("auto") == "uint8"
    assert resolve_int8_weights("int8") == "int8"


# ------------------------------------------------------------------------------------------- rewrite

def _operands(seed=0):
    """Activations with outlier channels (as real ones have) and int8 weights over the full range: the case
    where u8 x s8 pair sums leave int16."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * 2).astype(np.float32)
    x[:, :4] *= 20
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    scale = rng.uniform(0.005, 0.02, N).astype(np.float32)
    return x, w, scale


def _dynamic_uint8(x):
    """ONNX DynamicQuantizeLinear."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    s = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / s), 0, 255)
    return np.clip(np.round(x / s) + zp, 0, 255), s, zp


def _model(kind, x, w, scale):
    """One ORT int8 MatMul over constant int8 weights, as compilekit's translations emit it."""
    inits = [numpy_helper.from_array(w, "B"), numpy_helper.from_array(scale, "b_scale")]
    if kind == "DynamicQuantizeMatMul":
        nodes = [helper.make_node(kind, ["x", "B", "b_scale"], ["y"], domain="com.microsoft")]
    else:
        q, s, zp = _dynamic_uint8(x)
        inits += [numpy_helper.from_array(np.array(s, np.float32), "a_scale"),
                  numpy_helper.from_array(np.array(zp, np.uint8), "a_zp")]
        quantize = helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"])
        if kind == "MatMulIntegerToFloat":
            nodes = [quantize, helper.make_node(kind, ["xq", "B", "a_scale", "b_scale", "a_zp"], ["y"],
                                                domain="com.microsoft")]
        else:
            nodes = [quantize, helper.make_node(kind, ["xq", "B", "a_zp"], ["acc"]),
                     helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                     helper.make_node("Mul", ["accf", "b_scale"], ["ys"]),
                     helper.make_node("Mul", ["ys", "a_scale"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def _run(model, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _exact(x, w, scale):
    q, s, zp = _dynamic_uint8(x)
    return ((q - zp) @ w.astype(np.float64)) * float(s) * scale.astype(np.float64)


def _rewritten(model):
    import onnx_ir as ir

    m = ir.from_proto(model)
    count = int8_weights_as_uint8(m)
    return ir.to_proto(m), count


@pytest.mark.parametrize("kind", ["DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"])
def test_uint8_weights_give_the_exact_integer_result(kind):
    x, w, scale = _operands()
    model = _model(kind, x, w, scale)
    fixed, count = _rewritten(model)
    assert count == 1
    node = next(n for n in fixed.graph.node if n.op_type == kind)
    inits = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    b = inits[node.input[1]]
    zp_index = {"DynamicQuantizeMatMul": 3, "MatMulIntegerToFloat": 5, "MatMulInteger": 3}[kind]
    zero_point = inits[node.input[zp_index]]
    assert b.dtype == np.uint8 and np.array_equal(b.astype(np.int16) - 128, w)  # the same integers
    assert zero_point.dtype == np.uint8 and (zero_point == 128).all() and zero_point.shape == (N,)
    assert "B" not in inits  # the int8 copy no node reads is dropped
    onnx.checker.check_model(fixed)
    want = _exact(x, w, scale)
    got = _run(fixed, x)
    # Integer products are exact; what is left is float32 rounding of the scales (outputs reach ~1e2).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3 * float(np.abs(want).max()) * 1e-2)


def test_int8_weights_saturate_on_a_cpu_without_vnni():
    """Why the rewrite exists. On a CPU where int8 weights are exact this shows nothing, so it skips there."""
    if signed_int8_exact():
        pytest.skip("this CPU has VNNI: ORT's u8s8 kernel is exact here, nothing to show")
    x, w, scale = _operands()
    model = _model("DynamicQuantizeMatMul", x, w, scale)
    want = _exact(x, w, scale)
    assert np.abs(_run(model, x) - want).max() > 0.05 * np.abs(want).max()


def test_rewrite_leaves_other_matmuls_alone():
    """Weights that already have a zero point, uint8 weights and a float MatMul: nothing to do."""
    x, w, scale = _operands()
    u8 = (w.astype(np.int16) + 128).astype(np.uint8)
    inits = [numpy_helper.from_array(w, "B"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(u8, "U"),
             numpy_helper.from_array(np.zeros(N, np.int8), "zp"),
             numpy_helper.from_array(np.ones((K, N), np.float32), "F")]
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "B", "s", "zp"], ["y1"], domain="com.microsoft"),
             helper.make_node("DynamicQuantizeMatMul", ["x", "U", "s"], ["y2"], domain="com.microsoft"),
             helper.make_node("MatMul", ["x", "F"], ["y3"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [M, N]) for n in ("y1", "y2", "y3")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    fixed, count = _rewritten(model)
    assert count == 0
    assert [list(n.input) for n in fixed.graph.node] == [list(n.input) for n in model.graph.node]


# ----------------------------------------------------------------------------------------- compat

def _manifest(int8_weights):
    return {"target": {"backend": "onnxruntime", "options": {"providers": ["cpu"]}},
            "build": {} if int8_weights is None else {"int8_weights": int8_weights}}


def test_int8_weight_artifacts_are_refused_without_vnni(monkeypatch):
    from compilekit.registry.compat import manifest_incompatibilities

    monkeypatch.setattr(ort_int8, "signed_int8_exact", lambda: False)
    reasons = manifest_incompatibilities(_manifest("int8"))
    assert len(reasons) == 1 and "VNNI" in reasons[0] and "int8_weights: uint8" in reasons[0]
    assert manifest_incompatibilities(_manifest("uint8")) == []
    assert manifest_incompatibilities(_manifest(None)) == []
    monkeypatch.setattr(ort_int8, "signed_int8_exact", lambda: True)
    assert manifest_incompatibilities(_manifest("int8")) == []
