"""compilekit.targets.ort_attention: com.microsoft.Attention -> MatMul + Split + opset-23 Attention, on hand-built
graphs: same outputs in ONNX Runtime, and the cases the rewrite must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compilekit.targets.ort_attention import contrib_attention_as_standard, ort_has_standard_attention

pytestmark = pytest.mark.skipif(not ort_has_standard_attention(), reason="ONNX Runtime < 1.23: no opset-23 Attention")

B, S, E, HEADS = 2, 7, 32, 4


def _model(attrs=None, mask: str = "bias", bias: bool = True, qkv=(E, E, E)) -> onnx.ModelProto:
    """x [B, S, E] -> com.microsoft.Attention(x, W, b, mask_index?, past?, attention_bias?) -> y, opset 18."""
    rng = np.random.default_rng(0)
    n = sum(qkv)
    inits = [numpy_helper.from_array((rng.standard_normal((E, n)) * 0.2).astype(np.float32), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), "b"))
        inputs.append("b")
    else:
        inputs.append("")
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", E])]
    if mask == "bias":  # additive [B, 1, S, S], as the exporter builds a padding mask
        inputs += ["", "", "mask"]
        graph_inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "seq", "seq"]))
    elif mask == "broadcast":  # [B, 1, 1, S]: the contrib op broadcasts it, ORT's standard kernel does not
        inputs += ["", "", "mask"]
        graph_inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "seq"]))
    elif mask == "index":  # int32 [B, S] key padding mask
        inputs += ["mask"]
        graph_inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch", "seq"]))
    node = helper.make_node("Attention", inputs, ["y"], domain="com.microsoft", num_heads=HEADS,
                            qkv_hidden_sizes=list(qkv), **(attrs or {}))
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", qkv[2]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((B, S, E)).astype(np.float32)}
    names = {i.name: i for i in model.graph.input}
    if "mask" in names:
        keep = np.ones((B, S), dtype=bool)
        keep[1, 4:] = False  # the second row is padded
        if names["mask"].type.tensor_type.elem_type == TensorProto.INT32:
            feeds["mask"] = keep.astype(np.int32)
        else:
            additive = np.where(keep, 0.0, -1e4).astype(np.float32)[:, None, None, :]
            dims = [d.dim_value or d.dim_param for d in names["mask"].type.tensor_type.shape.dim]
            feeds["mask"] = additive if dims[2] == 1 else np.ascontiguousarray(np.broadcast_to(additive, (B, 1, S, S)))
    return feeds


def _run(model: onnx.ModelProto, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    irm = ir.from_proto(model)
    counts = contrib_attention_as_standard(irm)
    return ir.to_proto(irm), counts


@pytest.mark.parametrize("case", [
    {},
    {"bias": False},
    {"qkv": (E, E, 2 * E)},                      # value heads wider than query/key heads
    {"attrs": {"scale": 0.3}},
    {"attrs": {"unidirectional": 1}},            # causal, top-left as the contrib op
    {"mask": "none"},
], ids=["padding-mask", "no-bias", "wide-v", "scale", "causal", "no-mask"])
def test_rewrite_matches_contrib_op(case):
    model = _model(**case)
    want = _run(model, _feeds(model))
    new, counts = _rewrite(model)
    assert counts == {"attention_as_standard": 1}
    onnx.checker.check_model(new)
    ops = [(n.domain, n.op_type) for n in new.graph.node]
    assert ("", "Attention") in ops and ("com.microsoft", "Attention") not in ops, ops
    assert ("", "Split") in ops and ("", "MatMul") in ops
    assert ("", "Add") in ops if case.get("bias", True) else ("", "Add") not in ops
    assert {o.domain: o.version for o in new.opset_import}[""] == 23
    attention = next(n for n in new.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["q_num_heads"] == attrs["kv_num_heads"] == HEADS
    got = _run(new, _feeds(model))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case, reason", [
    ({"mask": "index"}, "mask_index / past input"),
    ({"mask": "broadcast"}, "attention_bias is not known to be [.., S, T]"),
    ({"qkv": (E, 2 * E, E)}, "q/k/v sizes unknown or q != k"),
], ids=["int-mask", "broadcast-mask", "q-ne-k"])
def test_rewrite_leaves_alone_with_reason(case, reason):
    model = _model(**case)
    new, counts = _rewrite(model)
    assert counts == {f"attention_kept_contrib ({reason})": 1}
    assert [(n.domain, n.op_type) for n in new.graph.node] == [("com.microsoft", "Attention")]
    assert {o.domain: o.version for o in new.opset_import}[""] == 18  # nothing rewritten: opset untouched


def test_no_attention_is_a_no_op():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    new, counts = _rewrite(model)
    assert counts == {}
    assert {o.domain: o.version for o in new.opset_import}[""] == 18


def _mha_model(mask: str = "bias", qkv_dims=(E, E, E), extra_inputs: int = 0) -> onnx.ModelProto:
    """q, k, v [B, S, *] -> com.microsoft.MultiHeadAttention(q, k, v, bias?, key_padding_mask?, attention_bias?)."""
    names = ["q", "k", "v"]
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", d]) for n, d in zip(names, qkv_dims)]
    inputs = list(names)
    if mask == "bias":
        inputs += ["", "", "mask"]
        graph_inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "seq", "seq"]))
    elif mask == "key_padding":
        inputs += ["", "mask"]
        graph_inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch", "seq"]))
    inits = []
    if mask == "packed_bias":
        inputs += ["qkv_bias"]
        inits.append(numpy_helper.from_array(np.zeros(sum(qkv_dims), np.float32), "qkv_bias"))
    node = helper.make_node("MultiHeadAttention", inputs, ["y"], domain="com.microsoft", num_heads=HEADS)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", qkv_dims[2]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _mha_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name in ("q", "k", "v"):
            feeds[value.name] = rng.standard_normal((B, S, dims[2])).astype(np.float32)
    keep = np.ones((B, S), dtype=bool)
    keep[0, 5:] = False
    names = {i.name: i for i in model.graph.input}
    if "mask" in names:
        if names["mask"].type.tensor_type.elem_type == TensorProto.INT32:
            feeds["mask"] = keep.astype(np.int32)
        else:
            feeds["mask"] = np.ascontiguousarray(np.broadcast_to(
                np.where(keep, 0.0, -1e4).astype(np.float32)[:, None, None, :], (B, 1, S, S)))
    return feeds


@pytest.mark.parametrize("case", [{}, {"mask": "none"}, {"qkv_dims": (E, E, 2 * E)}],
                         ids=["padding-mask", "no-mask", "wide-v"])
def test_multi_head_attention_rewrite_matches(case):
    model = _mha_model(**case)
    feeds = _mha_feeds(model)
    want = _run(model, feeds)
    new, counts = _rewrite(model)
    assert counts == {"multi_head_attention_as_standard": 1}
    onnx.checker.check_model(new)
    assert [(n.domain, n.op_type) for n in new.graph.node] == [("", "Attention")]
    np.testing.assert_allclose(_run(new, feeds), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask, reason", [("key_padding", "key_padding_mask / past input"),
                                          ("packed_bias", "packed bias input")])
def test_multi_head_attention_left_alone_with_reason(mask, reason):
    model = _mha_model(mask=mask)
    new, counts = _rewrite(model)
    assert counts == {f"multi_head_attention_kept_contrib ({reason})": 1}
    assert [(n.domain, n.op_type) for n in new.graph.node] == [("com.microsoft", "MultiHeadAttention")]


def test_float16_attention_left_alone():
    model = _mha_model()
    for value in [*model.graph.input, *model.graph.output]:
        if value.name != "mask":
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    new, counts = _rewrite(model)
    assert counts == {"multi_head_attention_kept_contrib (query/key/value not known to be float32)": 1}
